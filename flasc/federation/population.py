"""Who the clients are: index lists into the training split (never copies of the data), and, for
personalised evaluation, each client's own held-out examples."""

from __future__ import annotations

import math

import torch

from data import Task, resolved_partition
from data import partition as partition_mod
from flasc.options import ConfigError
from flasc.runtime import seeding


def make_clients(cfg, task: Task) -> list[torch.Tensor]:
    """Index tensors into task.train, one per client (partition, iid_alpha, min_client_size, iid_mix)."""
    rng = seeding.numpy_rng(cfg.seed, "partition")
    partition = resolved_partition(cfg)
    try:
        if partition == "natural":
            parts = partition_mod.natural(task.users, cfg.clients, cfg.min_client_size)
        elif partition == "iid":
            parts = partition_mod.iid(len(task.train), cfg.clients, rng, cfg.min_client_size)
        else:
            parts = partition_mod.dirichlet(task.skew_labels()[0], cfg.clients, cfg.iid_alpha, rng, cfg.min_client_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.iid_mix > 0:
        parts = partition_mod.iid_mix(parts, cfg.iid_mix, rng)
    return [torch.from_numpy(p) for p in parts]


def hold_out_local_tests(cfg, clients: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """eval_personalized: each client's data split into what it trains on and its own held-out test
    examples, round(local_test_fraction · n) of them in a seeded order (at least one of a client
    with two or more examples). Without it: the clients unchanged and no local tests."""
    if not cfg.eval_personalized:
        return clients, []
    train, test = [], []
    for c, idx in enumerate(clients):
        n_test = int(math.floor(cfg.local_test_fraction * len(idx) + 0.5))
        n_test = min(max(n_test, 1 if len(idx) >= 2 else 0), max(len(idx) - 1, 0))
        order = idx[torch.randperm(len(idx), generator=seeding.torch_generator(cfg.seed, "local_test", c))]
        test.append(order[:n_test].sort().values)
        train.append(order[n_test:].sort().values)
    return train, test
