"""What one round hands from stage to stage, and the parts that hang off it.

    plan (RoundPlan) -> client work ([ClientResult]) -> reduce (Reduced) -> server step

train_lora.Federation runs the four stages; a RoundCallback (drift statistics, shadow strategies)
sees the reduced round before the server step and the server after it, and returns metrics for the
round's line of metrics.jsonl. Callbacks are given the round's values, never the federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flasc.client.worker import ClientJob, ClientResult
from flasc.federation.tiers import Plan


class Diverged(RuntimeError):
    """Training went non-finite: the message names the round and what. The run stops (exit code 3)
    with its last good checkpoint and strict-JSON outputs up to the round before."""


@dataclass
class RoundPlan:
    """Everything decided before any client trains: a pure function of the seed, the round and the
    server as it is (planning changes nothing, so a round abandoned before its server step leaves
    no trace)."""

    rnd: int
    dl_density: float
    ul_density: float
    plans: list[Plan]  # one per tier (one without tiers)
    starts: list[torch.Tensor]  # each tier's download
    jobs: list[ClientJob]  # the sampled clients, in client order, prepared by the algorithm
    shares: list[list[int]]  # the clients each rank trains (balanced by size; the same on every rank)

    @property
    def by_id(self) -> dict[int, ClientJob]:
        return {j.client_id: j for j in self.jobs}


@dataclass
class Reduced:
    """The round after its clients' work and the reduce: what the server step applies."""

    plan: RoundPlan
    results: list[ClientResult]  # every sampled client's, in client order
    kept: list[ClientResult]  # those whose update the server receives (diverged_clients)
    updates: list  # the kept updates as the run's aggregator merges them (merging.ClientUpdate)
    pseudo_grad: torch.Tensor  # after the Gaussian mechanism
    merge_info: dict = field(default_factory=dict)


class RoundCallback:
    """A part that hangs off the round; each hook returns metrics for the round's line."""

    def before_step(self, rnd: int, reduced: Reduced, server_state) -> dict:
        """After the reduce, before the server steps (server_state is the round's starting point)."""
        return {}

    def after_step(self, rnd: int, reduced: Reduced, server_state) -> dict:
        """After the server step and everything the algorithm does after it."""
        return {}


def kept_results(results: list[ClientResult], policy: str, rnd: int) -> list[ClientResult]:
    """The results whose update the server receives. A diverged client (non-finite loss or update)
    stops the run (diverged_clients: stop; the lowest client id is named) or is left out (skip)."""
    diverged = [r for r in results if r.diverged]
    if diverged and policy == "stop":
        raise Diverged(f"round {rnd + 1}: client {diverged[0].client_id}'s local {diverged[0].diverged} is not finite")
    kept = [r for r in results if not r.diverged]
    if not kept:
        raise Diverged(f"round {rnd + 1}: the local training of every sampled client diverged")
    return kept


def round_metrics(reduced: Reduced, tiers: int, server_lr: float) -> dict:
    """The round's line of metrics.jsonl (before evaluation): training metrics over the clients whose
    update was kept, bytes over every client (a diverged client's download happened)."""
    results, kept = reduced.results, reduced.kept
    total = lambda key: sum(r.metrics[key] for r in kept)  # noqa: E731
    count = max(total("count"), 1)
    down = [sum(r.bytes_down for r in results if r.tier == i) for i in range(max(tiers, 1))]
    up = [sum(r.bytes_up for r in results if r.tier == i) for i in range(max(tiers, 1))]
    # bytes sent before the round's training that belong to it (Fed-SB's initialisation, round 1)
    setup_up = reduced.merge_info.get("setup_bytes_up", 0)
    setup_down = reduced.merge_info.get("setup_bytes_down", 0)
    per_tier = {}
    if tiers > 1:
        for i in range(tiers):
            per_tier.update({f"bytes_up_tier{i}": up[i], f"bytes_down_tier{i}": down[i]})
    return {
        "train_loss": total("loss_sum") / count,
        "train_accuracy": total("correct") / count,
        "local_epochs": total("epochs") / len(kept),
        "server_lr": server_lr,
        "stats_seconds": sum(r.stats_seconds for r in results),
        **reduced.merge_info,
        "update_norm": total("norm") / len(kept),
        "clipped_fraction": sum(int(r.metrics["clipped"]) for r in kept) / len(kept),
        "diverged_clients": len(results) - len(kept),
        "dl_density": reduced.plan.dl_density,
        "ul_density": reduced.plan.ul_density,
        "bytes_down": sum(down) + setup_down,
        "bytes_up": sum(up) + setup_up,
        **per_tier,
    }
