"""Client work: a group of clients trained on the resident model, each from its download, and
what each of them sends back.

    [ClientJob(client, tier, start, plan)]  ->  ClientWorker.train_group  ->  [ClientResult]

A job says where the client starts (the server as its tier downloads it, with the client's own
state where its algorithm keeps one: algorithms.py) and its plan (gradient mask, what it may send,
upload density); a result is the update after the upload chain
(uploads.py), the statistics its strategy (and any shadow strategy, shadows.py) asks for (Fisher,
Gram), its training metrics, its new state and anything else its algorithm sends (SCAFFOLD's Δc),
and the bytes of both directions (only the run's own statistic is sent). The group is trained one client after another; a backend that trains a
group at once (stacked adapters) or on another rank keeps this interface. Every random draw is
seeded by (seed, purpose, round, client), so a client's result does not depend on the group, the
rank or the order it is trained in.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

import checkpoint
import communication
import models
import seeding
import stacked
import uploads
from evaluation import logits_of
from interrupts import INTERRUPTS
from optimizers import CLIENT_OPTIMIZERS, adjust_gradients
from tiers import Plan


@dataclass
class ClientJob:
    client_id: int
    tier: int
    start: torch.Tensor     # where the client starts: its download (and its own state, algorithms.py)
    plan: Plan
    state: object = None    # what the algorithm needs again after training (e.g. SCAFFOLD's c_i)
    training: dict = field(default_factory=dict)   # train_client extras: grad_offset, penalty


@dataclass
class ClientResult:
    client_id: int
    tier: int
    num_examples: int
    update: torch.Tensor | None      # as uploaded; None when local training diverged (nothing is sent)
    bytes_down: int
    bytes_up: int = 0
    statistics: dict = field(default_factory=dict)  # Aggregator.statistic_key -> that statistic
    metrics: dict = field(default_factory=dict)     # loss_sum, correct, count, epochs; norm, clipped
    diverged: str | None = None      # what went non-finite: "training loss" or "update"
    stats_seconds: float = 0.0
    new_state: torch.Tensor | None = None   # the client's state after this round (kept, not sent)
    extra: dict = field(default_factory=dict)   # what else it sends (SCAFFOLD's Δc) or reports (a pruned rank)

    def to(self, device) -> "ClientResult":
        """The same result with its tensors on `device` (results travel between ranks on the CPU)."""
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return replace(self, update=move(self.update), new_state=move(self.new_state),
                       extra={k: move(v) for k, v in self.extra.items()},
                       statistics={key: {k: move(v) for k, v in stats.items()} for key, stats in self.statistics.items()})


class ClientWorker:
    """Trains clients on the resident model (state.ResidentModel) of this process."""

    def __init__(self, cfg, resident, task, clients: list[torch.Tensor], pairs, statistics: dict | None = None,
                 sent: str | None = None, algorithm=None):
        """statistics: key -> (statistic, product_space), what the strategies need; sent: the key of
        the one the run's strategy uploads (counted in bytes_up); algorithm: the run's
        algorithms.FedAvg (or other), whose `finish` makes a client's new state."""
        self.cfg, self.resident, self.task, self.clients = cfg, resident, task, clients
        self.pairs, self.statistics, self.sent, self.algorithm = pairs, statistics or {}, sent, algorithm
        self.flat = resident.flat
        self._stacked = None

    # -- a client's data, in seeded orders
    def client_epochs(self, rnd: int, client: int):
        """For each local epoch, the client's minibatches in a seeded order."""
        g = seeding.torch_generator(self.cfg.seed, "client", rnd, client)
        idx = self.clients[client]
        for _ in range(self.cfg.client_epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            yield (self.task.train.batch(order[s:s + self.cfg.client_batch])
                   for s in range(0, len(order), self.cfg.client_batch))

    def client_batches(self, rnd: int, client: int):
        """All the client's minibatches of a round, epoch after epoch (without early stopping)."""
        for epoch in self.client_epochs(rnd, client):
            yield from epoch

    def client_examples(self, rnd: int, client: int, count: int) -> dict:
        """Up to `count` of the client's examples in a seeded order, for merge statistics."""
        g = seeding.torch_generator(self.cfg.seed, "stats", rnd, client)
        idx = self.clients[client]
        return self.task.train.batch(idx[torch.randperm(len(idx), generator=g)[:count]])

    # -- local training
    def train_client(self, rnd: int, client: int, start: torch.Tensor, grad_mask: list[torch.Tensor] | None,
                     grad_offset: list[torch.Tensor] | None = None, penalty=None) -> tuple[torch.Tensor, dict]:
        """Load `start` into the model, train locally, return the client's flat parameters.
        grad_offset: added to every gradient (SCAFFOLD's c − c_i); penalty(named trainable
        tensors): added to every loss (HetLoRA's rank regulariser)."""
        cfg, model, device = self.cfg, self.resident.model, self.resident.device
        self.flat.write(start)
        # Dropout draws from torch's global generator: seed it per (seed, round, client).
        torch.manual_seed(seeding.derive_seed(cfg.seed, "client", rnd, client, 1))
        opt = CLIENT_OPTIMIZERS[cfg.client_opt](self.flat.params, cfg.client_lr)
        anchors = self.flat.split(start) if cfg.mu > 0 else None
        models.training_mode(model, cfg.base_dropout)
        objective = self.task.objective
        named = dict(zip(self.flat.names, self.flat.params)) if penalty is not None else None
        loss_sum, correct, count, epochs_run, steps = 0.0, 0, 0, 0, 0
        for epoch in self.client_epochs(rnd, client):
            epoch_correct, epoch_count = 0, 0
            for batch in epoch:
                logits = logits_of(model, batch, device, cfg.bf16)
                loss = objective.loss(logits, batch)
                opt.zero_grad(set_to_none=True)
                (loss if penalty is None else loss + penalty(named)).backward()
                adjust_gradients(self.flat.params, grad_offset, anchors, cfg.mu, grad_mask)
                opt.step()
                steps += 1
                hits, n = objective.hits(logits.detach(), batch)  # units: examples, labels or tokens
                loss_sum += loss.item() * n
                epoch_correct += hits
                epoch_count += n
            correct, count, epochs_run = correct + epoch_correct, count + epoch_count, epochs_run + 1
            if cfg.early_stopping > 0 and epoch_count and epoch_correct / epoch_count >= cfg.early_stopping:
                break
        return self.flat.read(), {"loss_sum": loss_sum, "correct": correct, "count": count,
                                  "epochs": epochs_run, "steps": steps}

    def stacked(self):
        """The resident model routed per client for training groups together (stacked.py), built once."""
        if self._stacked is None:
            self._stacked = stacked.StackedModel(self.resident.model, self.flat)
        return self._stacked

    def train_group(self, rnd: int, jobs: list[ClientJob], on_client=None) -> list[ClientResult]:
        """Each job's client trained (client_parallelism of them at a time in shared passes,
        stacked.py), its update through the upload chain, its statistic computed.
        diverged_clients stop: the group ends at the first diverged client (the round will stop)."""
        results, size = [], self.cfg.client_parallelism
        for first in range(0, len(jobs), size):
            together = jobs[first:first + size]
            if on_client is not None:
                on_client(rnd, first + len(together), len(jobs))
            with INTERRUPTS.allowed():  # an interrupt may abandon local training at once
                trained = ([self.train_job(rnd, together[0])] if len(together) == 1 else
                           stacked.train_together(self, rnd, together))
            for job, (client_params, metrics) in zip(together, trained):
                results.append(self.finish_job(rnd, job, client_params, metrics))
                if results[-1].diverged and self.cfg.diverged_clients == "stop":
                    return results
        return results

    def train_job(self, rnd: int, job: ClientJob) -> tuple[torch.Tensor, dict]:
        """train_client for one job: its start, its gradient mask and its algorithm's extras."""
        mask = None if job.plan.train is None else self.flat.split(job.plan.train.to(job.start.dtype))
        return self.train_client(rnd, job.client_id, job.start, mask, **job.training)

    def finish_job(self, rnd: int, job: ClientJob, client_params: torch.Tensor, metrics: dict) -> ClientResult:
        """A trained client's result: its update through the upload chain, its algorithm's state and
        extras, its statistics."""
        cfg, plan, start = self.cfg, job.plan, job.start
        result = ClientResult(job.client_id, job.tier, len(self.clients[job.client_id]), None,
                              bytes_down=plan.dl_bytes, metrics=metrics)
        delta = start - client_params
        if not math.isfinite(metrics["loss_sum"]):
            return replace(result, diverged="training loss")   # its download happened, nothing is sent
        if not bool(torch.isfinite(delta).all()):
            return replace(result, diverged="update")
        upload = uploads.prepare(delta, [uploads.restrict(plan.restrict), uploads.sparsify(plan.ul_density),
                                         uploads.clip(cfg.l2_clip_norm)])
        result = replace(result, update=upload.delta, bytes_up=upload.bytes,
                         metrics={**metrics, "norm": upload.norm, "clipped": upload.clipped})
        if self.algorithm is not None:
            new_state, extra, extra_bytes = self.algorithm.finish(job, client_params, metrics)
            result = replace(result, new_state=new_state, extra=extra, bytes_up=result.bytes_up + extra_bytes)
        if self.statistics:  # of the model the client uploads, on its own examples
            t0 = time.perf_counter()
            self.flat.write(start - upload.delta)
            computed, sent_values = {}, 0
            for key, (statistic, product_space) in self.statistics.items():
                batch = self.client_examples(rnd, job.client_id, getattr(cfg, statistic.examples_option))
                computed[key], values = statistic.compute(self.resident, self.task.objective, batch, self.pairs,
                                                          product_space)
                sent_values += values if key == self.sent else 0
            result = replace(result, statistics=computed,
                             bytes_up=result.bytes_up + communication.VALUE_BYTES * sent_values,
                             stats_seconds=time.perf_counter() - t0)
        checkpoint.crash_point("mid_round", rnd + 1)
        return result
