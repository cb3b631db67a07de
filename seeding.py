"""Every random choice draws from a generator seeded by (seed, purpose, round, client).

Deriving each stream from its coordinates (rather than from one shared stream consumed in
order) makes results independent of the order in which clients are visited and of resuming.
"""
from __future__ import annotations

import numpy as np
import torch

# Purposes keep streams of different kinds apart even at equal (round, client).
PURPOSES = {"model_init": 0, "partition": 1, "sampling": 2, "client": 3, "split": 4, "merge": 5, "stats": 6, "noise": 7, "tiers": 8}


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
