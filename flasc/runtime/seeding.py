"""Every random choice draws from a generator seeded by (seed, purpose, round, client).

Deriving each stream from its coordinates (rather than from one shared stream consumed in
order) makes results independent of the order in which clients are visited and of resuming.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager

import numpy as np
import torch

# Purposes keep streams of different kinds apart even at equal (round, client).
PURPOSES = {
    "model_init": 0,
    "partition": 1,
    "sampling": 2,
    "client": 3,
    "split": 4,
    "merge": 5,
    "stats": 6,
    "noise": 7,
    "tiers": 8,
    "shadow_eval": 9,
    "local_test": 10,
    "flora_init": 11,
    "flexlora_complement": 12,
    "fedsvd_complement": 13,
    "fedsb_init": 14,
}


def derive_seed(seed: int, purpose: str, *coords: int) -> int:
    """A 63-bit seed determined by the run seed, a purpose and integer coordinates."""
    entropy = [int(seed), PURPOSES[purpose], *(int(c) for c in coords)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, purpose: str, *coords: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, purpose, *coords))
    return g


def numpy_rng(seed: int, purpose: str, *coords: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *coords))


class ClientStreams:
    """Each client's own state of torch's global generators (CPU and this device's), seeded per
    (seed, round, client) as a client trained alone seeds them."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.states = []
        for seed in seeds:
            torch.manual_seed(seed)
            self.states.append(self._get())

    def _get(self):
        return (torch.get_rng_state(), None if self.device is None else torch.cuda.get_rng_state(self.device))

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if self.device is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextmanager
    def use(self, k: int):
        """Client k's generators for the draws inside the block."""
        self._set(self.states[k])
        try:
            yield
        finally:
            self.states[k] = self._get()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """deterministic: true. Seeding fixes every random draw, but some CUDA kernels (atomic adds in
    backward passes, cuBLAS's split reductions) sum in a different order on every call; torch's
    deterministic mode picks order-stable kernels (or raises where there is none), cuDNN stops
    benchmarking algorithms, and cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, set here
    unless the environment already sets it, before the run's first CUDA matrix product). Attention
    runs on PyTorch's math kernel: the fused flash / memory-efficient / cuDNN attention backward
    passes accumulate with atomics. The previous settings are restored afterwards."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cuda = torch.backends.cuda
    fused_attention = {
        name: getattr(cuda, f"{name}_sdp_enabled")()
        for name in ("flash", "mem_efficient", "cudnn")
        if hasattr(cuda, f"{name}_sdp_enabled")
    }
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    for name in fused_attention:
        getattr(cuda, f"enable_{name}_sdp")(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        for name, was in fused_attention.items():
            getattr(cuda, f"enable_{name}_sdp")(was)
