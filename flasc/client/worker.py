"""Client work: a group of clients trained on the resident model, each from its download, and
what each of them sends back.

    [ClientJob(client, tier, start, plan)]  ->  ClientWorker.train_group  ->  [ClientResult]

A job says where the client starts (the server as its tier downloads it, with the client's own
state where its algorithm keeps one: flasc/algorithms/), its plan (gradient mask, what it may
send, upload density) and its algorithm's training extras; a result is the update after the upload
chain (flasc/federation/uploads.py), the statistics its strategy (and any shadow strategy) asks
for (Fisher, Gram), its training metrics, its new state and anything else its algorithm sends
(SCAFFOLD's Δc), and the bytes of both directions (only the run's own statistic is sent).

The clients of a round are trained client_parallelism at a time by the one local-training loop
(local.py): a group of one on the resident model itself, larger groups through stacked adapters
(stacked.py). Every random draw is seeded by (seed, purpose, round, client), so a client's result
does not depend on the group, the rank or the order it is trained in.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace

import torch

from flasc import models
from flasc.client import stacked
from flasc.client.local import NO_EXTRAS, LocalClient, LocalSettings, TrainingExtras, train_local
from flasc.federation import communication, uploads
from flasc.federation.tiers import Plan
from flasc.runtime import seeding
from flasc.runtime.interrupts import INTERRUPTS
from flasc.runtime.seeding import ClientStreams
from flasc.tasks.evaluation import logits_of


@dataclass
class ClientJob:
    client_id: int
    tier: int
    start: torch.Tensor  # where the client starts: its download (and its own state: flasc/algorithms/)
    plan: Plan
    state: object = None  # what the algorithm needs again after training (e.g. SCAFFOLD's c_i)
    extras: TrainingExtras = NO_EXTRAS  # what its algorithm adds to local training


@dataclass
class ClientResult:
    client_id: int
    tier: int
    num_examples: int
    update: torch.Tensor | None  # as uploaded; None when local training diverged (nothing is sent)
    bytes_down: int
    bytes_up: int = 0
    statistics: dict = field(default_factory=dict)  # Aggregator.statistic_key -> that statistic
    metrics: dict = field(default_factory=dict)  # loss_sum, correct, count, epochs; norm, clipped
    diverged: str | None = None  # what went non-finite: "training loss" or "update"
    stats_seconds: float = 0.0
    new_state: torch.Tensor | None = None  # the client's state after this round (kept, not sent)
    extra: dict = field(default_factory=dict)  # what else it sends (SCAFFOLD's Δc) or reports (a pruned rank)

    def to(self, device) -> ClientResult:
        """The same result with its tensors on `device` (results travel between ranks on the CPU)."""
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return replace(
            self,
            update=move(self.update),
            new_state=move(self.new_state),
            extra={k: move(v) for k, v in self.extra.items()},
            statistics={key: {k: move(v) for k, v in stats.items()} for key, stats in self.statistics.items()},
        )


class ClientWorker:
    """Trains clients on the resident model (state.ResidentModel) of this process."""

    def __init__(
        self,
        cfg,
        resident,
        task,
        clients: list[torch.Tensor],
        pairs,
        statistics: dict | None = None,
        sent: str | None = None,
        algorithm=None,
    ):
        """statistics: key -> (statistic, product_space), what the strategies need; sent: the key of
        the one the run's strategy uploads (counted in bytes_up); algorithm: the run's
        algorithms.FedAvg (or other), whose `finish` makes a client's new state."""
        self.cfg, self.resident, self.task, self.clients = cfg, resident, task, clients
        self.pairs, self.sent, self.algorithm = pairs, sent, algorithm
        self.statistics = {} if statistics is None else statistics  # the caller may add to it later
        self.flat = resident.flat
        self._stacked = None

    # -- a client's data, in seeded orders
    def client_epochs(self, rnd: int, client: int):
        """For each local epoch, the client's minibatches in a seeded order (client_steps: epoch
        after epoch until local training has taken its steps)."""
        g = seeding.torch_generator(self.cfg.seed, "client", rnd, client)
        idx = self.clients[client]
        if not len(idx):
            return
        for _ in itertools.count() if self.cfg.client_steps else range(self.cfg.client_epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            yield (
                self.task.train.batch(order[s : s + self.cfg.client_batch])
                for s in range(0, len(order), self.cfg.client_batch)
            )

    def client_batches(self, rnd: int, client: int):
        """All the client's minibatches of a round, epoch after epoch (without early stopping)."""
        for epoch in self.client_epochs(rnd, client):
            yield from epoch

    def client_examples(self, rnd: int, client: int, count: int) -> dict:
        """Up to `count` of the client's examples in a seeded order, for merge statistics. Their
        augmentation (images) draws from the client's own stream, seeded per (seed, round, client),
        and leaves the process's generators as it found them, so it does not depend on the group."""
        g = seeding.torch_generator(self.cfg.seed, "stats", rnd, client)
        idx = self.clients[client]
        chosen = idx[torch.randperm(len(idx), generator=g)[:count]]
        with torch.random.fork_rng(devices=[]):  # the CPU generator, where transforms draw
            torch.default_generator.manual_seed(seeding.derive_seed(self.cfg.seed, "stats", rnd, client, 1))
            return self.task.train.batch(chosen)

    # -- local training
    def local_client(
        self,
        rnd: int,
        client: int,
        params: list[torch.Tensor],
        start: torch.Tensor,
        grad_mask: list[torch.Tensor] | None,
        extras: TrainingExtras,
    ) -> LocalClient:
        """Client `client`'s local training from `start`, stepping `params` (its trainable tensors)."""
        anchors = self.flat.split(start) if self.cfg.mu > 0 else None
        return LocalClient(
            params,
            self.flat.names,
            self.client_epochs(rnd, client),
            LocalSettings.of(self.cfg, rnd),
            anchors,
            grad_mask,
            extras,
        )

    def streams(self, rnd: int, clients: list[int]) -> ClientStreams:
        """Each client's own torch generators (dropout, augmentation), seeded per (seed, round, client)."""
        seeds = [seeding.derive_seed(self.cfg.seed, "client", rnd, c, 1) for c in clients]
        return ClientStreams(seeds, self.resident.device)

    def train_client(
        self,
        rnd: int,
        client: int,
        start: torch.Tensor,
        grad_mask: list[torch.Tensor] | None,
        extras: TrainingExtras = NO_EXTRAS,
    ) -> tuple[torch.Tensor, dict]:
        """One client trained alone (a group of one) on the resident model itself: `start` loaded
        into the model's trainable tensors, local training, the client's flat parameters."""
        model, device, bf16 = self.resident.model, self.resident.device, self.resident.bf16
        self.flat.write(start)
        local = self.local_client(rnd, client, self.flat.params, start, grad_mask, extras)
        models.training_mode(model, self.cfg.base_dropout)

        def forward(active, batches, streams):
            with streams.use(active[0]):  # dropout draws from the client's own generators
                return [logits_of(model, batches[0], device, bf16)]

        return train_local([local], forward, self.task.objective, self.streams(rnd, [client]))[0]

    def train_job(self, rnd: int, job: ClientJob) -> tuple[torch.Tensor, dict]:
        """train_client for one job: its start, its gradient mask and its algorithm's extras."""
        return self.train_client(rnd, job.client_id, job.start, self.grad_mask(job), job.extras)

    def train_together(self, rnd: int, jobs: list[ClientJob]) -> list[tuple[torch.Tensor, dict]]:
        """The jobs' clients trained in shared passes (stacked adapters); for each, what
        train_client returns for it alone."""
        model, device, flat = self.resident.model, self.resident.device, self.flat
        params = [
            [
                chunk.view_as(p).to(p.dtype).clone().requires_grad_(True)
                for p, chunk in zip(flat.params, job.start.split(flat.numels))
            ]
            for job in jobs
        ]
        clients = [
            self.local_client(rnd, job.client_id, own, job.start, self.grad_mask(job), job.extras)
            for job, own in zip(jobs, params)
        ]
        streams = self.streams(rnd, [job.client_id for job in jobs])
        models.training_mode(model, self.cfg.base_dropout)
        routed = self.stacked()
        forward = stacked.group_forward(
            routed, params, device, self.resident.bf16, getattr(model.config, "pad_token_id", None)
        )
        with routed.engaged(streams):
            return train_local(clients, forward, self.task.objective, streams)

    def stacked(self) -> stacked.StackedModel:
        """The resident model routed per client for training groups together (stacked.py), built once."""
        if self._stacked is None:
            self._stacked = stacked.StackedModel(self.resident.model, self.flat)
        return self._stacked

    def grad_mask(self, job: ClientJob) -> list[torch.Tensor] | None:
        """The job's gradient mask (client_freeze, a tier's components) shaped like the trainable tensors."""
        return None if job.plan.train is None else self.flat.split(job.plan.train.to(job.start.dtype))

    def train_group(self, rnd: int, jobs: list[ClientJob], on_client=None) -> list[ClientResult]:
        """Each job's client trained (client_parallelism of them at a time), its update through the
        upload chain, its statistic computed. diverged_clients stop: the group ends at the first
        diverged client (the round will stop)."""
        results, size = [], self.cfg.client_parallelism
        for first in range(0, len(jobs), size):
            together = jobs[first : first + size]
            if on_client is not None:
                on_client(rnd, first + len(together), len(jobs))
            with INTERRUPTS.allowed():  # an interrupt may abandon local training at once
                trained = (
                    [self.train_job(rnd, together[0])] if len(together) == 1 else self.train_together(rnd, together)
                )
            for job, (client_params, metrics) in zip(together, trained):
                results.append(self.finish_job(rnd, job, client_params, metrics))
                if results[-1].diverged and self.cfg.diverged_clients == "stop":
                    return results
        return results

    def finish_job(self, rnd: int, job: ClientJob, client_params: torch.Tensor, metrics: dict) -> ClientResult:
        """A trained client's result: its update through the upload chain, its algorithm's state and
        extras, its statistics."""
        cfg, plan, start = self.cfg, job.plan, job.start
        result = ClientResult(
            job.client_id, job.tier, len(self.clients[job.client_id]), None, bytes_down=plan.dl_bytes, metrics=metrics
        )
        delta = start - client_params
        if not math.isfinite(metrics["loss_sum"]):
            return replace(result, diverged="training loss")  # its download happened, nothing is sent
        if not bool(torch.isfinite(delta).all()):
            return replace(result, diverged="update")
        upload = uploads.prepare(
            delta, [uploads.restrict(plan.restrict), uploads.sparsify(plan.ul_density), uploads.clip(cfg.l2_clip_norm)]
        )
        result = replace(
            result,
            update=upload.delta,
            bytes_up=upload.bytes,
            metrics={**metrics, "norm": upload.norm, "clipped": upload.clipped},
        )
        if self.algorithm is not None:
            new_state, extra, extra_bytes = self.algorithm.finish(job, client_params, metrics)
            result = replace(result, new_state=new_state, extra=extra, bytes_up=result.bytes_up + extra_bytes)
        if self.statistics:  # of the model the client uploads, on its own examples
            t0 = time.perf_counter()
            self.flat.write(start - upload.delta)
            computed, sent_values = {}, 0
            for key, (statistic, product_space) in self.statistics.items():
                batch = self.client_examples(rnd, job.client_id, getattr(cfg, statistic.examples_option))
                computed[key], values = statistic.compute(
                    self.resident, self.task.objective, batch, self.pairs, product_space
                )
                sent_values += values if key == self.sent else 0
            result = replace(
                result,
                statistics=computed,
                bytes_up=result.bytes_up + communication.VALUE_BYTES * sent_values,
                stats_seconds=time.perf_counter() - t0,
            )
        return result
