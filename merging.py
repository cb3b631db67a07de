"""Server-side aggregation strategies, chosen by name with the option merging_strategy.

A strategy receives the round's client updates as uploaded (flat vectors, after sparsification)
and returns the pseudo-gradient that the server optimizer applies. Adding a strategy means one
registered function here, its config and its test; the round loop never names strategies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ClientUpdate:
    client_id: int
    delta: torch.Tensor   # flat: (server ⊙ download mask) − client, after upload sparsification
    num_examples: int


Strategy = Callable[[list[ClientUpdate], object], torch.Tensor]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def add(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn
    return add


@register("average")
def average(updates: list[ClientUpdate], cfg) -> torch.Tensor:
    """FedAvg: the unweighted mean of the updates (as in the FLASC seeds)."""
    return torch.stack([u.delta for u in updates]).mean(0)


def aggregate(updates: list[ClientUpdate], cfg) -> torch.Tensor:
    # Summation order is fixed by client id so the result never depends on visiting order.
    updates = sorted(updates, key=lambda u: u.client_id)
    return STRATEGIES[cfg.merging_strategy](updates, cfg)
