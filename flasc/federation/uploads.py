"""What a client sends: its update after its plan's chain of transforms, and what that costs.

update = (server ⊙ download mask) − client, then in order

    restrict   only the entries the client's tier holds (rank tiers: whole LoRA components)
    sparsify   global top-k of |update| at the plan's upload density (FLASC), k a fraction of what
               the client can send
    clip       scale to L2 norm at most l2_clip_norm (DP-FedAvg; after sparsification, as the seeds)

Each transform takes and returns an Upload and sets what it is responsible for (the values sent,
whether the receiver already knows their positions, the norm before clipping); the bytes are
counted once, from the final Upload, by communication.message_bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from flasc.federation import communication, privacy


@dataclass(frozen=True)
class Upload:
    delta: torch.Tensor  # the flat update as sent (zeros where nothing is sent)
    numel: int  # n, the length of the flat vector
    sent: int  # values sent
    positions_known: bool = False  # the receiver knows which entries come (a tier's components)
    space: int | None = None  # entries the client can send at all (None: numel)
    norm: float = 0.0  # L2 norm before clipping
    clipped: bool = False

    @property
    def bytes(self) -> int:
        """fp32 values, plus their positions unless the receiver knows them (then values only)."""
        if self.positions_known:
            return communication.VALUE_BYTES * self.sent
        return communication.message_bytes(self.numel if self.space is None else self.space, self.sent)


Transform = Callable[[Upload], Upload]


def restrict(mask: torch.Tensor | None) -> Transform:
    """Keep the entries of `mask` (None: all); a tier's mask is known to the server from its plan."""

    def transform(up: Upload) -> Upload:
        if mask is None:
            return up
        kept = int(mask.sum())
        return replace(up, delta=up.delta * mask, sent=kept, positions_known=True, space=kept)

    return transform


def sparsify(density: float) -> Transform:
    """Global top-k of |update|, k = int(n · density) with n the entries the client can send
    (density 1: unchanged); the positions are then sent too, over those n entries."""

    def transform(up: Upload) -> Upload:
        if density >= 1:
            return up
        space = up.numel if up.space is None else up.space
        k = int(space * density)
        mask = communication.top_k_mask(up.delta, k)
        return replace(up, delta=up.delta * mask, sent=int(mask.sum()), positions_known=False, space=space)

    return transform


def clip(clip_norm: float) -> Transform:
    """Scale to L2 norm at most clip_norm (0: off); records the norm before."""

    def transform(up: Upload) -> Upload:
        delta, norm = privacy.clip_update(up.delta, clip_norm)
        return replace(up, delta=delta, norm=norm, clipped=0 < clip_norm < norm)

    return transform


def prepare(delta: torch.Tensor, chain: list[Transform]) -> Upload:
    """The client's update through the chain, in order."""
    up = Upload(delta, delta.numel(), sent=delta.numel())
    for transform in chain:
        up = transform(up)
    return up
