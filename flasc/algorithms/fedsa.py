"""FedSA-LoRA (algorithm: fedsa)."""

from __future__ import annotations

from dataclasses import replace

import torch

from flasc.algorithms.base import FedAvg
from flasc.federation.communication import VALUE_BYTES


class FedSA(FedAvg):
    """FedSA-LoRA: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
    ICLR 2025. The A matrices learn what clients share and are averaged; each client's B matrices
    (and, with local_head, as in the paper's GLUE setup, its classifier head) stay on the client
    across rounds. A client taking part for the first time starts from the common initialisation (B
    = 0, the initial head); it sends the A entries (and the head without local_head).
    docs/algorithms.md ("What is sent") gives its bytes each way. The global model the run evaluates
    is Ā with the mean of the round's local parts, which no party holds (bookkeeping, not sent); the
    method's own figure is the personalised accuracy (eval_personalized)."""

    name = "fedsa"
    options = (*FedAvg.options, "local_head")
    rank_tiers = False
    learns_a = "the only shared part"
    shared_start = False
    personalised = True

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        initial = server_state.params.detach()
        b_entries = torch.zeros_like(self.lora)
        named = flat.named(b_entries)
        for pair in pairs:
            named[pair.b][:] = True
        self.local = b_entries | (~self.lora if cfg.local_head else torch.zeros_like(self.lora))
        self.shared = ~self.local
        self.state_numel = int(self.local.sum())
        self.initial_local = initial[self.local].clone()

    def with_state(self, vector: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        out = vector.clone()
        out[self.local] = self.initial_local if state is None else state.to(out.device)
        return out

    def prepare(self, rnd, job, state):
        plan = replace(job.plan, restrict=self.shared, dl_bytes=VALUE_BYTES * int(self.shared.sum()))
        return replace(job, start=self.with_state(job.start, state), plan=plan)

    def finish(self, job, params, metrics):
        return params[self.local].clone(), {}, 0

    def after_step(self, server_state, kept, jobs, rnd):
        states = torch.stack([r.new_state.to(self.lora.device) for r in sorted(kept, key=lambda r: r.client_id)])
        with torch.no_grad():
            server_state.params[self.local] = (self.weights(kept)[:, None] * states).sum(0)
        return {}

    def personal_model(self, client, state, download):
        return self.with_state(download, state)
