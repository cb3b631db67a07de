"""Federated algorithms (option `algorithm`): where each client starts, what it keeps between
rounds, what it sends, and how the server turns what it receives into the next global model.

    fedavg    the generic round: merging_strategy in merge_space, then server_opt (everything else
              in flasc: FedAvg, FedOpt, FedProx, FFA-LoRA with freeze_a, FLASC, the merges)
    fedsa     FedSA-LoRA: A aggregated, each client's B (and head) stay on the client
    scaffold  SCAFFOLD option II: control variates correct the local gradients
    fedex     FedEx-LoRA: A and B averaged, the residual of the average folded into W0
    flora     FLoRA: fresh adapters each round, stacked exactly and folded into W0
    flexlora  FlexLoRA: the weighted mean of the clients' B·A, truncated by SVD to each rank
    hetlora   HetLoRA: zero-padded ranks, weights by the norm of each client's B·A, optional
              rank self-pruning

An algorithm has five hooks, called in this order each round by train_lora.Federation.run_round:
`prepare` (a client's job from its tier's download and its stored state), the local training
extras the job carries (`training`: a gradient offset, a penalty), `finish` (after local
training: the client's new state and anything it sends besides its update), `aggregate` (the
pseudo-gradient the server optimizer applies) and `after_step` (what follows the server step).
Per-client vectors live in client_state.ClientStateStore; small per-client facts and server-side
extras (SCAFFOLD's c, the base-weight delta) are this object's `state_dict`.

Bytes of every message are counted where it is made; README "Federated LoRA baselines" tabulates
what each algorithm sends. Which options combine with which algorithm is checked in config.py.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

import seeding
import shadows
import tiers as tiers_mod
from base_weights import BaseDelta
from communication import VALUE_BYTES
from merging import client_weights


def _named_factors(flat, pair, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a layer in a flat vector (A the frozen one under freeze_a)."""
    named = flat.named(vector)
    a = pair.frozen_a.to(vector.device) if pair.a is None else named[pair.a]
    return a, named[pair.b]


def _components(pair, mask: torch.Tensor | None, flat) -> int:
    """Rank of a layer's download (components whose B column the mask keeps)."""
    if mask is None:
        return pair.rank
    return int(flat.named(mask)[pair.b].any(dim=0).sum())


class FedAvg:
    """The generic round (the default): the configured merging strategy and server optimizer."""
    name = "fedavg"
    state_numel = 0          # length of each client's stored state (0: the clients keep nothing)
    folds_base = False       # keeps a server-side delta of the base weights (base_weights.py)
    shared_start = True      # every client of a tier starts from the same download

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        self.cfg, self.flat, self.pairs, self.aggregator = cfg, flat, pairs, aggregator
        self.server_state = server_state
        initial = server_state.params.detach()
        device = initial.device
        self.lora = (tiers_mod.lora_entries(flat, pairs, device) if pairs
                     else torch.zeros(flat.numel, dtype=torch.bool, device=device))
        self.base = BaseDelta(pairs) if self.folds_base else None
        self.held = np.zeros(cfg.clients, dtype=np.int64)   # base increments each client holds

    @property
    def current(self) -> torch.Tensor:
        """The server's trainable vector as it is now."""
        return self.server_state.params.detach()

    # -- plan
    def prepare(self, rnd: int, job, state: torch.Tensor | None):
        """The client's job: where it starts, its plan and bytes down, its training extras."""
        if self.base is None:
            return job
        return replace(job, plan=replace(job.plan, dl_bytes=job.plan.dl_bytes + self.catch_up_bytes(job.client_id)))

    def catch_up_bytes(self, client: int) -> int:
        """Bytes of the base increments the client has missed; it holds them all afterwards."""
        values = self.base.catch_up_values(int(self.held[client]))
        self.held[client] = len(self.base.increments)
        return VALUE_BYTES * values

    # -- after local training
    def finish(self, job, params: torch.Tensor, metrics: dict) -> tuple[torch.Tensor | None, dict, int]:
        """(the client's new state or None, what else it sends, the bytes of that)."""
        return None, {}, 0

    # -- reduce
    def aggregate(self, kept, jobs: dict, rnd: int, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.aggregator.aggregate(shadows.updates_for(self.aggregator, kept), start, rnd)

    def after_step(self, server_state, kept, jobs: dict, rnd: int) -> dict:
        return {}

    # -- evaluation
    def personal_model(self, client: int, state: torch.Tensor | None, download: torch.Tensor) -> torch.Tensor:
        """The model client `client` holds: its download of the global model plus its own state."""
        return download

    # -- helpers
    def client_factors(self, pair, job, result) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k, B_k) the server reconstructs from the client's start and its uploaded update."""
        a0, b0 = _named_factors(self.flat, pair, job.start)
        named = self.flat.named(result.update)
        return (a0 if pair.a is None else a0 - named[pair.a]), b0 - named[pair.b]

    def weights(self, kept) -> torch.Tensor:
        return client_weights(sorted(kept, key=lambda r: r.client_id), self.cfg.weighting).to(self.lora.device)

    def state_dict(self) -> dict:
        return {"held": self.held.copy(), "base": None if self.base is None else self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.held = np.asarray(state["held"]).copy()
        if self.base is not None:
            self.base.load_state_dict(state["base"])


class FedSA(FedAvg):
    """FedSA-LoRA: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
    Learning", ICLR 2025. The A matrices learn what clients share and are averaged; each client's
    B matrices (and, with local_head, as in the paper's GLUE setup, its classifier head) stay on
    the client across rounds. A client taking part for the first time starts from the common
    initialisation (B = 0, the initial head). Down: the A entries (and the head without
    local_head); up: the same entries' update. The global model the run evaluates is Ā with the
    mean of the round's local parts, which no party holds (bookkeeping, not sent); the method's own
    figure is the personalised accuracy (eval_personalized)."""
    name = "fedsa"
    shared_start = False

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


class Scaffold(FedAvg):
    """SCAFFOLD: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020, Algorithm 1 with option II, on every trainable tensor (LoRA factors and
    head). Each local gradient g becomes g − c_i + c; after K local steps at client_lr η,
    c_i⁺ = c_i − c + (x − y)/(K η); the client sends Δy and Δc_i = c_i⁺ − c_i; the server steps
    on the mean Δy (server_lr is η_g) and sets c ← c + (|S|/N)·mean Δc_i. Down x and c, up Δy and
    Δc: twice FedAvg's bytes each way. With client_opt sgd (momentum 0.9) or an adaptive local
    optimizer the correction is added to the gradient before the optimizer, as the paper's
    derivation assumes plain SGD (approximate, as it is everywhere it is used so)."""
    name = "scaffold"

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.state_numel = flat.numel
        self.control = torch.zeros_like(server_state.params.detach())

    def prepare(self, rnd, job, state):
        c_i = torch.zeros_like(self.control) if state is None else state.to(self.control.device)
        plan = replace(job.plan, dl_bytes=2 * job.plan.dl_bytes)
        return replace(job, plan=plan, state=c_i,
                       training={"grad_offset": self.flat.split(self.control - c_i)})

    def finish(self, job, params, metrics):
        c_i, steps = job.state, metrics["steps"]
        new = c_i if steps == 0 else c_i - self.control + (job.start - params) / (steps * self.cfg.client_lr)
        return new, {"control": new - c_i}, VALUE_BYTES * self.flat.numel

    def after_step(self, server_state, kept, jobs, rnd):
        deltas = torch.stack([r.extra["control"].to(self.control.device) for r in sorted(kept, key=lambda r: r.client_id)])
        self.control += len(kept) / self.cfg.clients * deltas.mean(0)
        return {"control_norm": float(self.control.norm())}

    def state_dict(self):
        return {**super().state_dict(), "control": self.control.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.control = state["control"].to(self.control.device)


class FedEx(FedAvg):
    """FedEx-LoRA: Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
    Fine-Tuning of Foundation Models", ACL 2025. A, B and the head are averaged as in FedAvg; the
    residual s·(Σ p_k B_k A_k − B̄ Ā) of each layer is folded into its frozen base weight W0 (as
    out × in, without the original code's transpose), so that W0 + s·B̄Ā is exactly the mean of
    the clients' effective weights. Down: the factors and head, plus the base increments the
    client missed (base_weights.py); up: the factors and head."""
    name = "fedex"
    folds_base = True

    def after_step(self, server_state, kept, jobs, rnd):
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept)
        server = server_state.params.detach()
        increments, values = {}, {}
        for pair in self.pairs:
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            mean_product = sum(wk * (b @ a) for wk, (a, b) in zip(w, factors))
            a_new, b_new = _named_factors(self.flat, pair, server)
            increments[pair.name] = pair.scaling * (mean_product - b_new @ a_new)
            out_f, in_f = increments[pair.name].shape
            values[pair.name] = sum(_components(pair, jobs[r.client_id].plan.download, self.flat) for r in kept) * (in_f + out_f)
        self.base.add(increments, values)
        return {"base_residual_norm": math.sqrt(sum(float(x.square().sum()) for x in increments.values()))}


class FLoRA(FedAvg):
    """FLoRA: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
    Low-Rank Adaptations", NeurIPS 2024. Every round each client trains a fresh adapter (A drawn as
    peft draws it, from a generator seeded by (seed, round, client) that the server can replay;
    B = 0) at its tier's rank; the server stacks the adapters, which is exactly Σ p_k s B_k A_k,
    and folds that into W0; the head is averaged. The server's factors stay at B = 0, so the global
    model is W0 + delta with the averaged head. Down: the head and the stacks the client missed
    (base_weights.py; the seed of A costs nothing); up: A_k, B_k at its rank and the head."""
    name = "flora"
    folds_base = True
    shared_start = False

    def fresh(self, rnd: int, client: int, start: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = seeding.torch_generator(self.cfg.seed, "flora_init", rnd, client)
        out = start.clone()
        named = self.flat.named(out)
        for pair in self.pairs:
            if pair.a is not None:   # peft's kaiming_uniform(a=√5): U(−1/√in, 1/√in)
                shape = named[pair.a].shape
                named[pair.a].copy_((torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[1]))
            named[pair.b].zero_()
        return out if mask is None else out * mask

    def prepare(self, rnd, job, state):
        head = VALUE_BYTES * int((~self.lora).sum())   # the global factors are not downloaded
        return replace(job, start=self.fresh(rnd, job.client_id, job.start, job.plan.download),
                       plan=replace(job.plan, dl_bytes=head + self.catch_up_bytes(job.client_id)))

    def aggregate(self, kept, jobs, rnd, start):
        pseudo_grad, info = super().aggregate(kept, jobs, rnd, start)
        pseudo_grad = pseudo_grad.clone()
        pseudo_grad[self.lora] = 0   # the server's factors stay at (initial A, B = 0)
        return pseudo_grad, info

    def after_step(self, server_state, kept, jobs, rnd):
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept)
        increments, values = {}, {}
        for pair in self.pairs:
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            increments[pair.name] = pair.scaling * sum(wk * (b @ a) for wk, (a, b) in zip(w, factors))
            out_f, in_f = increments[pair.name].shape
            values[pair.name] = sum(_components(pair, jobs[r.client_id].plan.download, self.flat) for r in kept) * (in_f + out_f)
        self.base.add(increments, values)
        return {}


class FlexLoRA(FedAvg):
    """FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
    Tasks and Client Resources", NeurIPS 2024. The server forms ΔW_g = Σ p_k s B_k A_k per layer
    and factors it by SVD, U Σ Vᵀ: B = U Σ / s (the singular values in B), A = Vᵀ, components in
    decreasing σ. A client of rank r_k (a rank tier) downloads the first r_k components, so its
    adapter is exactly the best rank-r_k approximation of ΔW_g; the base is never modified; the
    head is averaged. All tiers use the adapter's scaling s = lora_alpha / lora_rank, so s·B·A
    means the same at every rank. Down and up: r_k (in + out) a layer, and the head."""
    name = "flexlora"

    def aggregate(self, kept, jobs, rnd, start):
        pseudo_grad, info = super().aggregate(kept, jobs, rnd, start)
        pseudo_grad = pseudo_grad.clone()
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept)
        server = self.flat.named(pseudo_grad)
        current = self.flat.named(self.current)
        kept_energy, total_energy = 0.0, 0.0
        for layer, pair in enumerate(self.pairs):
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            target = pair.scaling * sum(wk * (b @ a) for wk, (a, b) in zip(w, factors))
            b_new, a_new, sigma = svd_factors(target, pair.rank, pair.scaling, seeding.torch_generator(
                self.cfg.seed, "flexlora_complement", rnd, layer))
            server[pair.a].copy_(current[pair.a] - a_new)
            server[pair.b].copy_(current[pair.b] - b_new)
            kept_energy += float(sigma[:pair.rank].square().sum())
            total_energy += float(sigma.square().sum())
        info = {**info, "svd_energy_kept": kept_energy / total_energy if total_energy > 0 else 1.0}
        return pseudo_grad, info


def svd_factors(target: torch.Tensor, rank: int, scaling: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, σ): target ≈ s·B·A truncated to `rank` by SVD, σ in B, A with orthonormal rows.

    What the SVD leaves open is fixed, so that every device gives the same factors: a singular
    pair's sign (LAPACK and cuSOLVER choose differently) makes the largest-magnitude entry of its
    row of A positive (flipping both factors of a component flips every later update of them too:
    training is unchanged); and components beyond the target's rank (σ_j ≤ 1e-4 σ_1, far above
    float32 noise; an aggregate of low-rank clients), whose singular vectors are arbitrary, get
    B = 0 and rows of A that complete A's rows to an orthonormal set, drawn from `generator` on the
    CPU in float64, as a fresh LoRA component starts (B = 0, A random)."""
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    r = min(rank, sigma.numel())
    if sigma.numel():
        r = min(r, int((sigma > 1e-4 * sigma[0]).sum()))
    signs = torch.sign(vh[:r].gather(1, vh[:r].abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1
    u, vh = u[:, :r] * signs, vh[:r] * signs[:, None]
    b = torch.zeros(target.shape[0], rank, dtype=target.dtype, device=target.device)
    a = torch.zeros(rank, target.shape[1], dtype=target.dtype, device=target.device)
    b[:, :r] = u * sigma[:r] / scaling
    a[:r] = vh
    free = min(rank, target.shape[1]) - r
    if free > 0:
        a[r:r + free] = orthonormal_complement(vh, free, generator).to(a)
    return b, a, sigma


def orthonormal_complement(rows: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` random unit rows orthogonal to each other and to `rows` (orthonormal), in float64 on the CPU."""
    taken = rows.detach().double().cpu()
    draw = torch.randn(count, taken.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(2):   # project out twice: orthogonal to working precision
        draw = draw - (draw @ taken.T) @ taken
    q, r = torch.linalg.qr(draw.T)
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).T


class HetLoRA(FedAvg):
    """HetLoRA: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
    Models", EMNLP 2024. A client of rank r_k trains the first r_k components; the server
    zero-pads every client's A_k, B_k to the full rank and averages them with per-layer weights
    p_k = S_k / Σ_j S_j, S_k = ||s B_k A_k||_F (the data-size weights of `weighting` where every
    S_k is 0, and for the head). With hetlora_prune, local training adds
    λ·||B[:, t:r]||_F·||A[t:r, :]||_F (t = ⌊γ r⌋) per layer, and a client whose tail product
    shrank during training keeps rank max(1, t) from its next round on (this round it sends its
    rank r). Down and up: r_k (in + out) a layer, and the head."""
    name = "hetlora"

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.ranks = np.full(cfg.clients, -1, dtype=np.int64)   # a pruned client's rank (-1: its tier's)

    def tier_rank(self, tier: int) -> int:
        return 4 ** tier if self.cfg.tiers > 1 else self.cfg.lora_rank

    def rank_of(self, client: int, tier: int) -> int:
        return int(self.ranks[client]) if self.ranks[client] >= 0 else self.tier_rank(tier)

    def prepare(self, rnd, job, state):
        rank = self.rank_of(job.client_id, job.tier)
        if rank != self.tier_rank(job.tier):   # pruned below its tier: its own plan
            mask = tiers_mod.rank_mask(self.flat, self.pairs, rank, self.lora.device)
            job = replace(job, start=job.start * mask,
                          plan=replace(job.plan, download=mask, train=mask, restrict=mask,
                                       dl_bytes=VALUE_BYTES * int(mask.sum())))
        if not self.cfg.hetlora_prune:
            return job
        cut = math.floor(self.cfg.hetlora_gamma * rank)
        return replace(job, state=(rank, self.tail(job.start, rank, cut)),
                       training={"penalty": self.penalty(rank, cut)})

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
            return lam * sum((named[p.b][:, cut:rank].norm() *
                              (p.frozen_a.to(named[p.b].device) if p.a is None else named[p.a])[cut:rank].norm())
                             for p in pairs)
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
        return {"mean_client_rank": float(np.mean([self.rank_of(c, t) for c, t in
                                                   ((r.client_id, r.tier) for r in kept)]))}

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


ALGORITHMS = {cls.name: cls for cls in (FedAvg, FedSA, Scaffold, FedEx, FLoRA, FlexLoRA, HetLoRA)}
