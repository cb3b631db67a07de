"""HetLoRA (algorithm: hetlora)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from flasc.algorithms.base import FedAvg, _named_factors
from flasc.client.local import TrainingExtras
from flasc.federation import tiers as tiers_mod
from flasc.federation.communication import VALUE_BYTES


class HetLoRA(FedAvg):
    """HetLoRA: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
    Models", EMNLP 2024. A client of rank r_k trains the first r_k components; the server
    zero-pads every client's A_k, B_k to the full rank and averages them with per-layer weights
    p_k = S_k / Σ_j S_j, S_k = ||s B_k A_k||_F (the data-size weights of `weighting` where every
    S_k is 0, and for the head). With hetlora_prune, local training adds
    λ·||B[:, t:r]||_F·||A[t:r, :]||_F (t = ⌊γ r⌋) per layer, and a client whose tail product
    shrank during training keeps rank max(1, t) from its next round on (this round it sends its
    rank r). docs/algorithms.md ("What is sent") gives its bytes each way."""

    name = "hetlora"
    options = (*FedAvg.options, "hetlora_prune", "hetlora_gamma", "hetlora_lambda", "tiers", "lora_rank")
    prunes_rank = True

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.ranks = np.full(cfg.clients, -1, dtype=np.int64)  # a pruned client's rank (-1: its tier's)

    def tier_rank(self, tier: int) -> int:
        return tiers_mod.tier_rank(tier) if self.cfg.tiers > 1 else self.cfg.lora_rank

    def rank_of(self, client: int, tier: int) -> int:
        return int(self.ranks[client]) if self.ranks[client] >= 0 else self.tier_rank(tier)

    def prepare(self, rnd, job, state):
        rank = self.rank_of(job.client_id, job.tier)
        if rank != self.tier_rank(job.tier):  # pruned below its tier: its own plan
            mask = tiers_mod.rank_mask(self.flat, self.pairs, rank, self.lora.device)
            job = replace(
                job,
                start=job.start * mask,
                plan=replace(
                    job.plan, download=mask, train=mask, restrict=mask, dl_bytes=VALUE_BYTES * int(mask.sum())
                ),
            )
        if not self.cfg.hetlora_prune:
            return job
        cut = math.floor(self.cfg.hetlora_gamma * rank)
        return replace(
            job, state=(rank, self.tail(job.start, rank, cut)), extras=TrainingExtras(penalty=self.penalty(rank, cut))
        )

    def tail(self, vector: torch.Tensor, rank: int, cut: int) -> float:
        """Σ over layers of ||B[:, cut:rank]||_F · ||A[cut:rank, :]||_F."""
        total = 0.0
        for pair in self.pairs:
            a, b = _named_factors(self.flat, pair, vector)
            total += float(b[:, cut:rank].norm() * a[cut:rank].norm())
        return total

    def penalty(self, rank: int, cut: int):
        lam, pairs = self.cfg.hetlora_lambda, self.pairs

        def term(named: dict) -> torch.Tensor:
            return lam * sum(
                (
                    named[p.b][:, cut:rank].norm()
                    * (p.frozen_a.to(named[p.b].device) if p.a is None else named[p.a])[cut:rank].norm()
                )
                for p in pairs
            )

        return term

    def finish(self, job, params, metrics):
        if not self.cfg.hetlora_prune:
            return None, {}, 0
        rank, before = job.state
        cut = math.floor(self.cfg.hetlora_gamma * rank)
        after = self.tail(params, rank, cut)
        return None, ({"rank": max(1, cut)} if after < before and rank > 1 else {}), 0

    def aggregate(self, kept, jobs, rnd, start):
        pseudo_grad, info = super().aggregate(kept, jobs, rnd, start)
        pseudo_grad = pseudo_grad.clone()
        kept = sorted(kept, key=lambda r: r.client_id)
        fallback = self.weights(kept)
        grad, current = self.flat.named(pseudo_grad), self.flat.named(self.current)
        for pair in self.pairs:
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            p = hetlora_weights([pair.scaling * (b @ a) for a, b in factors], fallback)
            if pair.a is not None:
                grad[pair.a].copy_(current[pair.a] - sum(pk * a for pk, (a, _) in zip(p, factors)))
            grad[pair.b].copy_(current[pair.b] - sum(pk * b for pk, (_, b) in zip(p, factors)))
        return pseudo_grad, info

    def after_step(self, server_state, kept, jobs, rnd):
        for r in kept:
            if "rank" in r.extra:
                self.ranks[r.client_id] = r.extra["rank"]
        return {
            "mean_client_rank": float(np.mean([self.rank_of(c, t) for c, t in ((r.client_id, r.tier) for r in kept)]))
        }

    def personal_model(self, client, state, download):
        if self.ranks[client] < 0:
            return download
        return download * tiers_mod.rank_mask(self.flat, self.pairs, int(self.ranks[client]), download.device)

    def state_dict(self):
        return {**super().state_dict(), "ranks": self.ranks.copy()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ranks = np.asarray(state["ranks"]).copy()


def hetlora_weights(products: list[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """p_k = ||ΔW_k||_F / Σ_j ||ΔW_j||_F (the fallback weights when every norm is 0)."""
    norms = torch.stack([x.norm() for x in products])
    total = norms.sum()
    return fallback if float(total) == 0 else norms / total
