"""FLoRA (algorithm: flora)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from flasc.algorithms.base import FedAvg, _components
from flasc.federation.communication import VALUE_BYTES
from flasc.runtime import seeding


class FLoRA(FedAvg):
    """FLoRA: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
    Low-Rank Adaptations", NeurIPS 2024. Every round each client trains a fresh adapter (A drawn as
    peft draws it, from a generator seeded by (seed, round, client) that the server can replay; B =
    0) at its tier's rank; the server stacks the adapters, which is exactly Σ p_k s B_k A_k, and
    folds that into W0; the head is averaged. The server's factors stay at B = 0, so the global
    model is W0 + delta with the averaged head (the seed of A costs nothing to send).
    docs/algorithms.md ("What is sent") gives its bytes each way."""

    name = "flora"
    options = (*FedAvg.options, "seed")
    sets_server = True
    needs_linear_lora = True
    folds_base = True
    shared_start = False
    fresh_adapters = True

    def fresh(self, rnd: int, client: int, start: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = seeding.torch_generator(self.cfg.seed, "flora_init", rnd, client)
        out = start.clone()
        named = self.flat.named(out)
        for pair in self.pairs:
            if pair.a is not None:  # peft's kaiming_uniform(a=√5): U(−1/√in, 1/√in)
                shape = named[pair.a].shape
                named[pair.a].copy_((torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[1]))
            named[pair.b].zero_()
        return out if mask is None else out * mask

    def prepare(self, rnd, job, state):
        head = VALUE_BYTES * int((~self.lora).sum())  # the global factors are not downloaded
        return replace(
            job,
            start=self.fresh(rnd, job.client_id, job.start, job.plan.download),
            plan=replace(job.plan, dl_bytes=head + self.catch_up_bytes(job.client_id)),
        )

    def aggregate(self, kept, jobs, rnd, start):
        pseudo_grad, info = super().aggregate(kept, jobs, rnd, start)
        pseudo_grad = pseudo_grad.clone()
        pseudo_grad[self.lora] = 0  # the server's factors stay at (initial A, B = 0)
        return pseudo_grad, info

    def after_step(self, server_state, kept, jobs, rnd):
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept)
        increments, values = {}, {}
        for pair in self.pairs:
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            increments[pair.name] = pair.scaling * sum(wk * (b @ a) for wk, (a, b) in zip(w, factors))
            out_f, in_f = increments[pair.name].shape
            values[pair.name] = sum(_components(pair, jobs[r.client_id].plan.download, self.flat) for r in kept) * (
                in_f + out_f
            )
        self.base.add(increments, values)
        return {}
