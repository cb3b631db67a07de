"""Server-side aggregation: merging strategies (chosen by merging_strategy) in a merge space.

Every strategy receives the round's client updates as uploaded (update_k = server ⊙ mask − client_k,
after upload sparsification) and returns the pseudo-gradient that the server optimizer applies.
A strategy declares the client statistic it needs (`statistic`: flasc/client/statistics.py's
DiagonalFisher or InputGram), which the client work computes and uploads, the options it reads
and the combinations it refuses (`options`, `check`); the round calls `Aggregator.aggregate`.
Adding a strategy means one registered entry here, its config file and its test.

docs/aggregation.md gives each strategy's and merge space's exact rule. Two design choices live
here: the first six strategies are one parameterised operation (sparsify × sign consensus ×
rescale, mergekit's generalized task arithmetic), and product space re-factorizes a merged δW in
the gauge nearest to the clients' mean A (refactorize), so both factors stay well conditioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flasc.client import statistics as merge_statistics
from flasc.models.params import FlatParams, LoraPair, lora_pairs
from flasc.options import ConfigError
from flasc.runtime import seeding
from model_merging_methods import (
    dare_drop,
    disjoint_mean,
    elect_sign,
    fisher_weighted_mean,
    regmean_merge,
    shrink_gram,
    trim_magnitude,
    weighted_sum,
)


@dataclass
class ClientUpdate:
    client_id: int
    delta: torch.Tensor  # flat: (server ⊙ download mask) − client, after upload sparsification
    num_examples: int
    stats: dict = field(default_factory=dict)  # Fisher or Gram matrices, when the strategy needs them


Blocks = dict[str, torch.Tensor]  # name -> (clients, *shape)


def client_weights(updates: list[ClientUpdate], weighting: str) -> torch.Tensor:
    if weighting == "num_examples":
        w = torch.tensor([float(u.num_examples) for u in updates])
        if w.sum() > 0:
            return w / w.sum()
    return torch.full((len(updates),), 1.0 / len(updates))


# ------------------------------------------------------------------ merge spaces
# product space and RegMean on LoRA of convolutions: one message naming both ways out
_CONV = (
    "works on LoRA of linear layers; model {model} adapts convolutions; expected merge_space: factors and a "
    "strategy other than regmean"
)


def _linear_lora(cfg) -> tuple[bool, str]:
    """Whether the run's model puts LoRA on linear layers (not convolutions), and its name."""
    from flasc.models import resolve_name, spec_of

    return spec_of(cfg).linear_lora, resolve_name(cfg)


class FactorSpace:
    """Every trainable tensor merged entrywise, LoRA factors included."""

    name = "factors"

    @staticmethod
    def check(cfg) -> None:
        """Any trainable tensors merge entrywise."""

    def __init__(self, flat: FlatParams, pairs: list[LoraPair]):
        self.flat, self.pairs = flat, pairs

    def blocks(self, updates: list[ClientUpdate], start: torch.Tensor) -> Blocks:
        stacked = torch.stack([u.delta for u in updates])
        return {
            name: chunk.reshape(len(updates), *p.shape)
            for name, p, chunk in zip(self.flat.names, self.flat.params, stacked.split(self.flat.numels, dim=1))
        }

    def grams(self, updates: list[ClientUpdate]) -> Blocks:
        """Input Gram of each LoRA factor: x for A, A x for B."""
        out = {}
        for pair in self.pairs:
            if pair.a is not None:
                out[pair.a] = torch.stack([u.stats[pair.name + ".x"] for u in updates])
            out[pair.b] = torch.stack([u.stats[pair.name + ".ax"] for u in updates])
        return out

    def to_flat(self, merged: Blocks, updates, start, weights) -> tuple[torch.Tensor, dict]:
        return torch.cat([merged[name].reshape(-1) for name in self.flat.names]), {}


class ProductSpace(FactorSpace):
    """LoRA layers merged as weight updates δW = s·(B A − B_k A_k), then re-factorized to rank r."""

    name = "product"

    @staticmethod
    def check(cfg) -> None:
        linear, model = _linear_lora(cfg)
        if not linear:
            raise ConfigError(f"merge_space: product {_CONV}".format(model=model))
        if cfg.lora_rank <= 0:
            raise ConfigError(
                f"merge_space: product merges LoRA products B·A; expected lora_rank >= 1 "
                f"(got {cfg.lora_rank}) or merge_space: factors"
            )

    def _factors(self, pair: LoraPair, named: dict) -> tuple[torch.Tensor, torch.Tensor]:
        a = pair.frozen_a.to(named[pair.b].device) if pair.a is None else named[pair.a]
        return a, named[pair.b]

    def blocks(self, updates, start) -> Blocks:
        factor_blocks = super().blocks(updates, start)
        named = self.flat.named(start)
        out = {}
        lora = {pair.a for pair in self.pairs} | {pair.b for pair in self.pairs}
        for pair in self.pairs:
            a0, b0 = self._factors(pair, named)
            b_k = b0 - factor_blocks[pair.b]
            a_k = a0 if pair.a is None else a0 - factor_blocks[pair.a]
            out[pair.name] = pair.scaling * (b0 @ a0 - b_k @ a_k)
        out.update({name: blk for name, blk in factor_blocks.items() if name not in lora})
        return out

    def grams(self, updates) -> Blocks:
        return {pair.name: torch.stack([u.stats[pair.name + ".x"] for u in updates]) for pair in self.pairs}

    def to_flat(self, merged: Blocks, updates, start, weights) -> tuple[torch.Tensor, dict]:
        named = self.flat.named(start)
        factor_blocks = super().blocks(updates, start) if any(p.a for p in self.pairs) else {}
        grad = {name: merged[name] for name in self.flat.names if name in merged}
        residual, energy, per_layer = 0.0, 0.0, []
        for pair in self.pairs:
            a0, b0 = self._factors(pair, named)
            target = (pair.scaling * (b0 @ a0) - merged[pair.name]) / pair.scaling  # M / s
            if pair.a is None:
                a_new, b_new = a0, target @ torch.linalg.pinv(a0)
            else:
                a_ref = weighted_sum(a0 - factor_blocks[pair.a], weights)
                b_new, a_new = refactorize(target, a_ref, pair.rank)
            if pair.a is not None:
                grad[pair.a] = a0 - a_new
            grad[pair.b] = b0 - b_new
            total = float((target**2).sum()) * pair.scaling**2
            lost = float(((target - b_new @ a_new) ** 2).sum()) * pair.scaling**2
            residual += lost
            energy += total
            per_layer.append(1.0 - lost / total if total > 0 else 1.0)
        flat = torch.cat([grad[name].reshape(-1) for name in self.flat.names])
        info = {
            "svd_energy_kept": 1.0 - residual / energy if energy > 0 else 1.0,
            "svd_energy_kept_min": min(per_layer) if per_layer else 1.0,
        }
        return flat, info


def refactorize(target: torch.Tensor, a_ref: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, A) with B·A the best rank-`rank` approximation of target (truncated SVD
    U Σ Vᵀ), in the gauge closest to a reference A: A = c·Q·Vᵀ with Q the orthogonal matrix
    nearest to a_ref·V (orthogonal Procrustes) and c = ||a_ref||_F / √r, so A keeps the clients'
    scale and orientation and both factors stay well conditioned; B = U Σ Qᵀ / c."""
    if not torch.any(target):
        return torch.zeros(target.shape[0], a_ref.shape[0], dtype=target.dtype, device=target.device), a_ref
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    u, sigma, v = u[:, :rank], sigma[:rank], vh[:rank].T
    p, _, wh = torch.linalg.svd(a_ref @ v)
    q = p @ wh
    c = float(a_ref.norm()) / rank**0.5 or 1.0
    return (u * sigma) @ q.T / c, c * q @ v.T


SPACES = {"factors": FactorSpace, "product": ProductSpace}


# ------------------------------------------------------------------ strategies
class Strategy:
    """A merge of the clients' update blocks into one, given their weights. Declares the options it
    reads and checks the combinations it refuses."""

    statistic = None  # what clients compute on their own data and upload (flasc/client/statistics.py)
    options: tuple[str, ...] = ()

    def check(self, cfg) -> None:
        """Raise ConfigError for a run this strategy cannot merge."""

    def merge(self, blocks: Blocks, weights: torch.Tensor, ctx: Aggregator, updates) -> Blocks:
        raise NotImplementedError


@dataclass
class GeneralizedTaskArithmetic(Strategy):
    """sparsify (none | magnitude | dare) × sign consensus × rescale by λ, over any blocks."""

    sparsify: str | None = None
    consensus: bool = False
    scaled: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        own = {"magnitude": ("density", "ties_scope"), "dare": ("drop_rate",), None: ()}[self.sparsify]
        return ("weighting", *own, *(("scaling_coefficient",) if self.scaled else ()))

    def merge(self, blocks, weights, ctx, updates):
        cfg = ctx.cfg
        if self.sparsify == "magnitude":
            blocks = trim_blocks(blocks, cfg.density, cfg.ties_scope)
        elif self.sparsify == "dare":
            blocks = dare_blocks(blocks, cfg.drop_rate, cfg.seed, ctx.rnd, [u.client_id for u in updates])
        out = {}
        for name, tasks in blocks.items():
            if self.consensus:
                sign = elect_sign(tasks * weights.view(-1, *([1] * (tasks.dim() - 1))).to(tasks.dtype))
                merged = disjoint_mean(tasks, weights, sign)
            else:
                merged = weighted_sum(tasks, weights)
            out[name] = merged * cfg.scaling_coefficient if self.scaled else merged
        return out


def trim_blocks(blocks: Blocks, density: float, scope: str) -> Blocks:
    """Magnitude trim of each client's update, per tensor (block) or over all blocks together."""
    if scope == "tensor":
        return {name: torch.stack([trim_magnitude(t, density) for t in tasks]) for name, tasks in blocks.items()}
    names = list(blocks)
    m = next(iter(blocks.values())).shape[0]
    rows = torch.cat([blocks[n].reshape(m, -1) for n in names], dim=1)
    rows = torch.stack([trim_magnitude(r, density) for r in rows])
    sizes = [blocks[n][0].numel() for n in names]
    return {n: chunk.reshape(blocks[n].shape) for n, chunk in zip(names, rows.split(sizes, dim=1))}


def dare_blocks(blocks: Blocks, drop_rate: float, seed: int, rnd: int, clients: list[int]) -> Blocks:
    """DARE drop per client, from a generator seeded by (seed, round, client)."""
    gens = [seeding.torch_generator(seed, "merge", rnd, c) for c in clients]
    return {
        name: torch.stack([dare_drop(t, drop_rate, g) for t, g in zip(tasks, gens)]) for name, tasks in blocks.items()
    }


class FisherMerging(Strategy):
    statistic = merge_statistics.DiagonalFisher()
    options = ("weighting", "fisher_examples")

    def check(self, cfg) -> None:
        from data import DATASETS

        if DATASETS[cfg.dataset].objective == "next_token":
            raise ConfigError(
                f"merging_strategy: fisher takes the exact expectation over labels, out of reach over "
                f"a vocabulary at every token of dataset {cfg.dataset}; expected another strategy"
            )

    def merge(self, blocks, weights, ctx, updates):
        return {
            name: fisher_weighted_mean(tasks, torch.stack([u.stats[name] for u in updates]), weights)
            for name, tasks in blocks.items()
        }


class RegMean(Strategy):
    statistic = merge_statistics.InputGram()
    options = ("weighting", "regmean_examples", "regmean_alpha")

    def check(self, cfg) -> None:
        linear, model = _linear_lora(cfg)
        if not linear:
            raise ConfigError(f"merging_strategy: regmean {_CONV}".format(model=model))
        if cfg.lora_rank <= 0:
            raise ConfigError(
                f"merging_strategy: regmean merges LoRA layers; expected lora_rank >= 1 (got {cfg.lora_rank})"
            )
        if cfg.use_dora:
            raise ConfigError(
                "merging_strategy: regmean solves for the weight of a linear layer from its inputs; a DoRA layer "
                "rescales its weight by a magnitude over its norm, which is not linear; expected use_dora: false "
                "or another strategy"
            )

    def merge(self, blocks, weights, ctx, updates):
        grams = ctx.space.grams(updates)
        out = {}
        for name, tasks in blocks.items():
            if name in grams:
                g = shrink_gram(grams[name], ctx.cfg.regmean_alpha)
                out[name] = regmean_merge(tasks, g, weights)
            else:
                out[name] = weighted_sum(tasks, weights)
        return out


GTA = GeneralizedTaskArithmetic
STRATEGIES: dict[str, Strategy] = {
    "average": GTA(),
    "task_arithmetic": GTA(scaled=True),
    "ties": GTA(sparsify="magnitude", consensus=True, scaled=True),
    "dare": GTA(sparsify="dare", scaled=True),
    "dare_ties": GTA(sparsify="dare", consensus=True, scaled=True),
    "magnitude_prune": GTA(sparsify="magnitude"),
    "fisher": FisherMerging(),
    "regmean": RegMean(),
}


# ------------------------------------------------------------------ what the round loop calls
class Aggregator:
    """The configured strategy in the configured space, bound to the resident model."""

    def __init__(self, cfg, model: torch.nn.Module, flat: FlatParams):
        self.cfg = cfg
        self.flat = flat
        self.pairs = lora_pairs(model, flat) if cfg.lora_rank > 0 else []
        self.space = SPACES[cfg.merge_space](flat, self.pairs)
        self.strategy = STRATEGIES[cfg.merging_strategy]
        self.statistic = self.strategy.statistic
        self.rnd = 0

    @property
    def statistic_key(self) -> str | None:
        """Names the statistic this aggregator needs in its space (aggregators that need the same
        one share it), e.g. 'DiagonalFisher@product'; None when it needs none."""
        return None if self.statistic is None else f"{type(self.statistic).__name__}@{self.space.name}"

    def updates(self, results) -> list[ClientUpdate]:
        """The round's kept client results as the updates this aggregator merges (with its own statistic)."""
        return [
            ClientUpdate(r.client_id, r.update, r.num_examples, r.statistics.get(self.statistic_key, {}))
            for r in results
        ]

    def aggregate(self, updates: list[ClientUpdate], start: torch.Tensor, rnd: int) -> tuple[torch.Tensor, dict]:
        # Summation order is fixed by client id so the result never depends on visiting order.
        updates = sorted(updates, key=lambda u: u.client_id)
        self.rnd = rnd
        weights = client_weights(updates, self.cfg.weighting).to(start.device)
        blocks = self.space.blocks(updates, start)
        merged = self.strategy.merge(blocks, weights, self, updates)
        return self.space.to_flat(merged, updates, start, weights)
