"""Counterfactual aggregation (shadow_strategies): what other strategies would have made of the
same round, each applied to a copy of the server state and scored, the run itself untouched.
docs/diagnostics.md describes the metrics logged and how to read them.

Why it is a fair comparison: every shadow aggregates the run's own uploaded updates, gets the
run's own noise draw (privacy.release: one generator seeded by the round), and steps a copy of the
server state as it was before the run's step (same optimizer moments and learning rate); nothing
draws from a shared generator. Statistics shadows need (Fisher, Gram) travel with the results but
only the run's own statistic counts as communicated.
"""

from __future__ import annotations

import time

import torch

import merging
from flasc import options as config_mod
from flasc.federation import privacy
from flasc.round import RoundCallback
from flasc.runtime import seeding
from flasc.tasks.evaluation import Subset


def validation_subset(split, count: int, seed: int):
    """`count` examples of the split in a seeded order (0 or more than it has: the whole split)."""
    if count <= 0 or count >= len(split):
        return split
    g = seeding.torch_generator(seed, "shadow_eval")
    return Subset(split, torch.randperm(len(split), generator=g)[:count].sort().values)


def shadow_spec(entry: str, cfg) -> tuple[str, str]:
    """'ties@product' -> ('ties', 'product'); without @ the run's merge_space."""
    name, _, space = entry.partition("@")
    return name, space or cfg.merge_space


options = ("shadow_strategies", "shadow_freq", "shadow_eval_examples")


def check(cfg, check_run) -> None:
    """Each shadow strategy must be one the run could use itself (noise aside: shadows are analysis,
    their metrics are outside the privacy guarantee); check_run(config) checks a whole run's config."""
    for entry in cfg.shadow_strategies:
        name, space = shadow_spec(entry, cfg)
        trial = config_mod.Config(
            {**cfg, "merging_strategy": name, "merge_space": space, "shadow_strategies": [], "noise_multiplier": 0.0}
        )
        try:
            check_run(trial)
        except config_mod.ConfigError as e:
            raise config_mod.ConfigError(f"shadow_strategies: {entry}: {e}") from None


def shadow_aggregators(cfg, model, flat) -> dict[str, merging.Aggregator]:
    """One Aggregator per shadow_strategies entry, each with the run's options but its strategy and space."""
    out = {}
    for entry in cfg.shadow_strategies:
        name, space = shadow_spec(entry, cfg)
        shadow_cfg = config_mod.Config({**cfg, "merging_strategy": name, "merge_space": space})
        out[entry] = merging.Aggregator(shadow_cfg, model, flat)
    return out


class Shadows(RoundCallback):
    """The shadow strategies as a part of the round: in a round where they are due, the server state
    is copied before the run's step, and after it each shadow steps its own copy and is scored."""

    def __init__(self, cfg, aggregators: dict[str, merging.Aggregator], scores, split):
        """scores: the run's ServerScores (flasc/federation/scores.py); split: the examples scored."""
        self.cfg, self.aggregators, self.scores, self.split = cfg, aggregators, scores, split
        self.before = None

    def due(self, rnd: int) -> bool:
        return bool(self.aggregators) and (rnd + 1) % self.cfg.shadow_freq == 0

    def before_step(self, rnd, reduced, server_state) -> dict:
        self.before = server_state.copy() if self.due(rnd) else None
        return {}

    def after_step(self, rnd, reduced, server_state) -> dict:
        """The shadow metrics of round `rnd`; the run's own server is scored first."""
        if self.before is None:
            return {}
        before, self.before = self.before, None
        primary = self.scores.task.objective.primary
        own = self.scores.primary(server_state, server_state.params, self.split)
        out = {f"shadow_own_val_{primary}": own}
        own_norm = float(reduced.pseudo_grad.norm())
        for name, aggregator in self.aggregators.items():
            t0 = time.perf_counter()
            pseudo_grad, _ = aggregator.aggregate(aggregator.updates(reduced.kept), reduced.plan.starts[0], rnd)
            pseudo_grad = privacy.release(pseudo_grad, len(reduced.kept), self.cfg, rnd)  # the run's noise draw
            state = before.copy()
            state.step(pseudo_grad)
            value = self.scores.primary(server_state, state.params, self.split)
            out.update(
                {
                    f"shadow_{name}_val_{primary}": value,
                    f"shadow_{name}_gain": value - own,
                    f"shadow_{name}_distance": float((pseudo_grad - reduced.pseudo_grad).norm()) / max(own_norm, 1e-12),
                    f"shadow_{name}_seconds": time.perf_counter() - t0,
                }
            )
        return out
