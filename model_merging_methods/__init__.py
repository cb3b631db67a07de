"""Tensor-level merge operations; merging.py composes them into aggregation strategies."""

from model_merging_methods.ops import (
    dare_drop,
    disjoint_mean,
    elect_sign,
    fisher_weighted_mean,
    regmean_merge,
    shrink_gram,
    trim_magnitude,
    weighted_sum,
)

__all__ = [
    "dare_drop",
    "disjoint_mean",
    "elect_sign",
    "fisher_weighted_mean",
    "regmean_merge",
    "shrink_gram",
    "trim_magnitude",
    "weighted_sum",
]
