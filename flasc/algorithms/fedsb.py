"""Fed-SB (algorithm: fedsb), on LoRA-SB's adapter: W = W0 + s·B·R·A with B and A fixed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.nn.utils import parametrize

from flasc.algorithms.base import FedAvg
from flasc.algorithms.flexlora import fixed_signs
from flasc.federation.communication import VALUE_BYTES
from flasc.models.params import FixedB, fixed_b
from flasc.options import ConfigError
from flasc.runtime import seeding


def sandwich_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, σ, A): update ≈ B·diag(σ)·A, its best rank-`rank` approximation, B with orthonormal
    columns and A with orthonormal rows. A singular pair's sign makes the largest-magnitude entry of
    its row of A positive, so that every device gives the same factors."""
    u, sigma, vh = torch.linalg.svd(update, full_matrices=False)
    u, sigma, vh = u[:, :rank], sigma[:rank], vh[:rank]
    u, vh = fixed_signs(u, vh)
    return u, sigma, vh


def init_examples(cfg, task, clients: list[torch.Tensor]) -> tuple[torch.Tensor, object, list[int]]:
    """The examples the initialisation's gradient is taken on: fedsb_init_examples of them, drawn
    without replacement in a seeded order from the validation split (fedsb_init_data: validation,
    held by the server) or from the union of the clients' training examples (clients). Returns
    (indices, the split they index, the clients that hold them; empty for validation)."""
    g = seeding.torch_generator(cfg.seed, "fedsb_init")
    if cfg.fedsb_init_data == "validation" and not len(task.val):
        raise ConfigError(
            "fedsb_init_data: validation, and this data set's validation split is empty; expected "
            "fedsb_init_data: clients (or a validation split)"
        )
    if cfg.fedsb_init_data == "validation":
        order = torch.randperm(len(task.val), generator=g)
        return order[: cfg.fedsb_init_examples], task.val, []
    pooled = torch.cat([c for c in clients if len(c)])
    owner = torch.cat([torch.full((len(c),), k) for k, c in enumerate(clients) if len(c)])
    chosen = torch.randperm(len(pooled), generator=g)[: cfg.fedsb_init_examples]
    return pooled[chosen], task.train, sorted(set(owner[chosen].tolist()))


def weight_gradients(model, layers: list, split, indices: torch.Tensor, cfg, objective, device, bf16) -> list:
    """Per LoRA layer, the gradient of the examples' mean loss with respect to its base weight W
    (out × in, as the layer computes y = W x), Σ_tokens (∂L/∂y) xᵀ, from hooks on each layer's
    input and output: this works for quantized and transposed (Conv1D) bases alike, whose weight
    has no gradient of its own. The model is in eval mode (no dropout; which also turns
    transformers' gradient checkpointing off, so that with gradient_checkpointing the examples go
    one at a time); its adapter is the fresh one (B = 0), so the model is the base. The sums are
    float32 on the CPU, one layer's product at a time on the device."""
    from flasc.tasks.evaluation import logits_of

    sums = [torch.zeros(m.out_features, m.in_features) for m in layers]
    size = 1 if cfg.gradient_checkpointing else cfg.client_batch
    starts = range(0, len(indices), size)
    total = sum(objective.units(split.batch(indices[s : s + size])) for s in starts)
    if not total:
        raise ConfigError(
            f"fedsb_init_examples: the {len(indices)} examples drawn for the initialisation have nothing "
            "the loss counts (no labels or response tokens); expected more examples"
        )

    def hook(i):
        def forward_hook(module, args, kwargs, output):
            x = (args[0] if args else next(iter(kwargs.values()))).detach()

            def add(g):  # returns None: the gradient flows on unchanged
                sums[i].add_((g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()).cpu())

            output.register_hook(add)

        return forward_hook

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for s in starts:
            batch = split.batch(indices[s : s + size])
            loss, _, n = objective.train_terms(logits_of(model, batch, device, bf16), batch)
            (loss * (n / total)).backward()  # the mean over every example's units
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


class FedSB(FedAvg):
    """Fed-SB: Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
    Performance in (Private) Federated LoRA Fine-Tuning" (arXiv 2502.15436), on LoRA-SB's adapter
    (Ponkshe et al., arXiv 2411.19557): each adapted layer is W0 + s·B·R·A with B (out × r) and A
    (r × in) fixed and the same on every client, and only R (r × r) trained (with the head). The
    mean of the clients' products is then exactly the product of the mean R, Σ p_k B R_k A =
    B R̄ A, so the server averages R (the generic round: clipping, DP noise, any server optimizer)
    and every client uploads r² values a layer whatever the rank of the update.

    The initialisation, as LoRA-SB's code computes it, once before round 1: the gradient G of the
    mean loss over fedsb_init_examples examples with respect to each base weight (in eval mode),
    the first step of full fine-tuning with Adam approximated as ΔW = −η·sign(G) (η =
    fedsb_init_lr), and its SVD ΔW ≈ U Σ Vᵀ truncated to r: B = U, A = Vᵀ, R = Σ/s, so that
    training starts from W0 + ΔW_r. The examples come from the validation split, which the server
    holds (fedsb_init_data: validation, the default: no client sends anything, and the noise's ε
    covers every use of the clients' data), or from the union of the clients' training data
    (clients: the clients holding them each upload their gradient sum, out × in values a layer,
    counted in round 1's bytes_up and as its setup_bytes_up, and the initial head each downloads
    first in bytes_down and setup_bytes_down). Each client downloads B and A once, with
    its first download. docs/algorithms.md ("What is sent") gives the bytes each way.

    The adapter is peft's, with lora_B's weight parametrized as B·R (FixedB); the saved adapter is
    a plain LoRA one, B·R in lora_B (models/saving.py)."""

    name = "fedsb"
    options = (*FedAvg.options, "seed", "lora_rank", "bf16", "fedsb_init_examples", "fedsb_init_data", "fedsb_init_lr")
    rank_tiers = False
    needs_linear_lora = True
    learns_a = None

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.freeze_a:
            raise ConfigError(
                "freeze_a: algorithm fedsb fixes A and B itself (only R trains); expected freeze_a: false"
            )
        if cfg.use_dora:
            raise ConfigError(
                "use_dora: algorithm fedsb trains R between fixed factors, and DoRA's magnitude would be a "
                "second trained part the paper does not have; expected use_dora: false"
            )
        if cfg.init_lora_weights != "default":
            raise ConfigError(
                "init_lora_weights: algorithm fedsb sets B, R and A from its own initialisation; expected "
                "init_lora_weights: default"
            )
        if cfg.lora_plus_ratio != 1:
            raise ConfigError(
                "lora_plus_ratio: sets B's learning rate relative to A's; with algorithm fedsb neither trains "
                "(only R); expected lora_plus_ratio: 1"
            )
        if cfg.noise_multiplier > 0 and cfg.fedsb_init_data == "clients":
            raise ConfigError(
                "fedsb_init_data: the initialisation's gradient on the clients' examples is sent without "
                "noise, which the accountant's epsilon would not cover; expected fedsb_init_data: validation "
                "(the server's split) with noise_multiplier > 0"
            )

    @classmethod
    def adapt_model(cls, cfg, model, task, clients, device, world) -> dict:
        """LoRA-SB's initialisation (rank 0 computes it, every rank gets the same factors), then
        every LoRA layer made W0 + s·B·R·A with only R trained."""
        from flasc.models.params import lora_modules

        layers = lora_modules(model)
        small = [(n, m) for n, m in layers if min(m.out_features, m.in_features) < cfg.lora_rank]
        if small:
            name, m = small[0]
            raise ConfigError(
                f"lora_rank: algorithm fedsb's B and A are the top {cfg.lora_rank} singular vectors of each "
                f"layer's update; {name} is {m.out_features} × {m.in_features}; expected lora_rank <= "
                f"{min(m.out_features, m.in_features)}"
            )
        indices, split, holders = init_examples(cfg, task, clients)
        modules = [m for _, m in layers]

        def factors():
            grads = weight_gradients(model, modules, split, indices, cfg, task.objective, device, cfg.bf16)
            out = []
            for g in grads:
                b, sigma, a = sandwich_factors(-cfg.fedsb_init_lr * torch.sign(g.double()), cfg.lora_rank)
                out.append((b.cpu(), sigma.cpu(), a.cpu()))
            return out

        for module, (b, sigma, a) in zip(modules, world.from_main(factors)):
            scaling = float(module.scaling["default"])
            lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
            with torch.no_grad():
                lora_a.weight.copy_(a.to(lora_a.weight))
            lora_a.weight.requires_grad_(False)
            parametrize.register_parametrization(lora_b, "weight", FixedB(b.to(lora_b.weight)), unsafe=True)
            with torch.no_grad():
                lora_b.parametrizations.weight.original.copy_(torch.diag(sigma / scaling).to(lora_b.weight))
        shapes = [(m.out_features, m.in_features) for m in modules]
        factor_values = sum(cfg.lora_rank * (o + i) for o, i in shapes)
        head = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(
            r.numel() for r in (m.lora_B["default"].parametrizations.weight.original for m in modules)
        )
        return {
            "layers": modules,
            "fedsb_init_examples": len(indices),
            "fedsb_init_clients": len(holders),
            "factor_bytes": VALUE_BYTES * factor_values,
            # a holder downloads the initial head, then sends its gradient sum of every layer
            "init_bytes_down": VALUE_BYTES * len(holders) * head,
            "init_bytes_up": VALUE_BYTES * len(holders) * sum(o * i for o, i in shapes),
        }

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.has_factors = np.zeros(cfg.clients, dtype=bool)  # which clients hold B and A
        self.setup = {}

    def adapted(self, setup: dict) -> None:
        self.setup = setup

    def prepare(self, rnd, job, state):
        job = super().prepare(rnd, job, state)
        if self.has_factors[job.client_id]:
            return job
        return replace(job, plan=replace(job.plan, dl_bytes=job.plan.dl_bytes + self.setup["factor_bytes"]))

    def downloaded(self, jobs) -> None:
        super().downloaded(jobs)
        for job in jobs:
            self.has_factors[job.client_id] = True

    def after_step(self, server_state, kept, jobs, rnd):
        info = super().after_step(server_state, kept, jobs, rnd)
        if rnd == 0:
            info = {
                **info,
                "setup_bytes_up": self.setup["init_bytes_up"],
                "setup_bytes_down": self.setup["init_bytes_down"],
                "fedsb_init_examples": self.setup["fedsb_init_examples"],
                "fedsb_init_clients": self.setup["fedsb_init_clients"],
            }
        return info

    def state_dict(self) -> dict:
        """With the fixed factors themselves: recomputed on another device or library version, a
        sign of G near zero could flip and move B·R·A (a resume restores them as they were)."""
        factors = [
            (fixed_b(m).detach().cpu().clone(), m.lora_A["default"].weight.detach().cpu().clone())
            for m in self.setup["layers"]
        ]
        return {**super().state_dict(), "has_factors": self.has_factors.copy(), "factors": factors}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.has_factors = np.asarray(state["has_factors"]).copy()
        with torch.no_grad():
            for m, (b, a) in zip(self.setup["layers"], state["factors"]):
                fixed_b(m).copy_(b)
                m.lora_A["default"].weight.copy_(a)
