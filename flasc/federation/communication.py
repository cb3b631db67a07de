"""The FLASC part: top-k masks, density schedules and the bytes a message would take."""

from __future__ import annotations

import math

import torch

VALUE_BYTES = 4  # fp32
INDEX_BYTES = 4  # int32 position


def density_at(density: float, decay: float, decay_freq: int, rnd: int) -> float:
    """density_t = density * decay^(t // decay_freq), rounds counted from 0."""
    return density * decay ** (rnd // decay_freq)


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = int(n * density) entries of largest |x|, over the whole flat vector.

    Exactly k entries are kept even with ties (torch.topk breaks them deterministically).
    """
    return top_k_mask(x, int(x.numel() * density))


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k entries of largest |x| (ties broken deterministically by torch.topk)."""
    flat = x.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k >= flat.numel():
        mask.fill_(True)
    elif k > 0:
        mask[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return mask.view_as(x)


def message_bytes(n: int, k: int) -> int:
    """Bytes to send k of n fp32 values: whichever encoding is cheapest.

    dense: 4n. sparse: 4k values plus positions, as an n-bit bitmap (ceil(n/8) bytes) or as
    k int32 indices, whichever is smaller.
    """
    dense = VALUE_BYTES * n
    if k >= n:
        return dense
    sparse = VALUE_BYTES * k + min(math.ceil(n / 8), INDEX_BYTES * k)
    return min(dense, sparse)
