"""Counterfactual aggregation: what other strategies would have made of the same round.

With `shadow_strategies: [ties, fisher, ties@product, ...]`, in every round where it is due
(`shadow_freq`), each listed strategy (in the run's merge space, or the one after @) aggregates
the same uploaded updates the run aggregated. Its pseudo-gradient gets the same DP noise draw (a
generator seeded by the round) and is applied by a copy of the server state as it was before the
run's own step (same optimizer moments, same learning rate); the resulting server is scored on the
validation split (`shadow_eval_examples` of it, a fixed seeded subset; 0: all of it), masked as the
run's own evaluation is. Logged per shadow NAME (metrics.jsonl, TensorBoard):

    shadow_NAME_val_METRIC   the shadow server's validation primary metric
    shadow_NAME_gain         that minus the run's own server's, scored on the same examples
    shadow_NAME_distance     ||shadow pseudo-gradient − the run's|| / ||the run's||
    shadow_NAME_seconds      what the shadow cost (aggregation, step, evaluation)

and shadow_own_val_METRIC, the run's own score on those examples. The run itself is untouched: its
server state is copied, never stepped by a shadow, and no shadow draws from a shared generator.
Statistics that shadows need (Fisher, Gram) are computed once per client with the run's own and
travel with the results, but only the run's own statistic is counted as communicated.
"""
from __future__ import annotations

import time

import torch

import config as config_mod
import merging
import privacy
import seeding


class Subset:
    """Some examples of a split, in the split's interface (len, batch of positions)."""

    def __init__(self, split, idx: torch.Tensor):
        self.split, self.idx = split, idx

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, positions: torch.Tensor) -> dict:
        return self.split.batch(self.idx[positions])


def validation_subset(split, count: int, seed: int):
    """`count` examples of the split in a seeded order (0 or more than it has: the whole split)."""
    if count <= 0 or count >= len(split):
        return split
    g = seeding.torch_generator(seed, "shadow_eval")
    return Subset(split, torch.randperm(len(split), generator=g)[:count].sort().values)


def shadow_aggregators(cfg, model, flat) -> dict[str, merging.Aggregator]:
    """One Aggregator per shadow_strategies entry, each with the run's options but its strategy and space."""
    out = {}
    for entry in cfg.shadow_strategies:
        name, space = config_mod.shadow_spec(entry, cfg)
        shadow_cfg = config_mod.Config({**cfg, "merging_strategy": name, "merge_space": space})
        out[entry] = merging.Aggregator(shadow_cfg, model, flat)
    return out


def updates_for(aggregator: merging.Aggregator, results) -> list[merging.ClientUpdate]:
    """The round's kept results as the updates this aggregator merges (with its own statistic)."""
    return [merging.ClientUpdate(r.client_id, r.update, r.num_examples, r.statistics.get(aggregator.statistic_key, {}))
            for r in results]


def run_shadows(cfg, aggregators: dict, primary: str, score, rnd: int, before, results, start: torch.Tensor,
                own_pseudo_grad: torch.Tensor) -> dict:
    """The shadow metrics of round `rnd`. before: a copy of the server state before the run's step;
    score(params): the validation primary metric of a server vector (masked and scored as the run's
    evaluation is); the run's own server is scored first."""
    own = score(None)
    out = {f"shadow_own_val_{primary}": own}
    own_norm = float(own_pseudo_grad.norm())
    for name, aggregator in aggregators.items():
        t0 = time.perf_counter()
        pseudo_grad, _ = aggregator.aggregate(updates_for(aggregator, results), start, rnd)
        if cfg.noise_multiplier > 0 or cfg.dp_divide_by_clip:   # the run's noise draw, the same for all
            pseudo_grad = privacy.noisy_mean(pseudo_grad, len(results), cfg.noise_multiplier, cfg.l2_clip_norm,
                                             seeding.torch_generator(cfg.seed, "noise", rnd), cfg.dp_divide_by_clip)
        state = before.copy()
        state.step(pseudo_grad)
        value = score(state.params)
        out.update({f"shadow_{name}_val_{primary}": value, f"shadow_{name}_gain": value - own,
                    f"shadow_{name}_distance": float((pseudo_grad - own_pseudo_grad).norm()) / max(own_norm, 1e-12),
                    f"shadow_{name}_seconds": time.perf_counter() - t0})
    return out
