"""Tensor-level merge operations. Task tensors are stacked on dim 0: (clients, *shape).

Where peft's definition is the one meant here (peft.utils.merge_utils), peft's function is used.
"""

from __future__ import annotations

import torch
from peft.utils import merge_utils


def _bcast(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def weighted_sum(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k τ_k. Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic")
    scales this by λ; with weights summing to one it is the (weighted) FedAvg mean."""
    return (tasks * _bcast(weights, tasks)).sum(0)


def trim_magnitude(task: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) entries of largest magnitude, zero the rest: the 'trim' step of
    TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", §3)."""
    if density >= 1:
        return task
    return merge_utils.magnitude_based_pruning(task, density)


def dare_drop(task: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p and rescale survivors by 1/(1−p), so the expectation
    is unchanged: DARE (Yu et al. 2024, "Language Models are Super Mario", §4). Same rule as peft's
    random_pruning(rescale=True) with density 1−p, but drawn from a given generator.

    The mask is drawn on the generator's device (the CPU for seeding's generators) and moved to the
    task's: a CUDA op refuses a CPU generator, and the same survivors on every device keep runs
    comparable across devices."""
    if drop_rate <= 0:
        return task
    probs = torch.full(task.shape, 1.0 - drop_rate, device=generator.device)
    keep = torch.bernoulli(probs, generator=generator).to(task.device, task.dtype)
    return task * keep / (1.0 - drop_rate)


def elect_sign(tasks: torch.Tensor) -> torch.Tensor:
    """Per entry, +1 or −1: the sign of the total mass Σ_k τ_k (ties go to +1); TIES 'elect'.
    Pass weighted tasks (w_k τ_k) to elect by weighted mass."""
    return torch.where(tasks.sum(0) >= 0, 1.0, -1.0).to(tasks.dtype)


def disjoint_mean(tasks: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the weighted mean over the tasks whose entry is nonzero with the elected sign
    (zero where none agrees); TIES 'disjoint merge'. With equal weights this is peft's disjoint_merge."""
    agree = (tasks.sign() == sign).to(tasks.dtype)
    w = _bcast(weights, tasks) * agree
    return (w * tasks).sum(0) / w.sum(0).clamp_min(torch.finfo(tasks.dtype).tiny)


def fisher_weighted_mean(
    tasks: torch.Tensor, fishers: torch.Tensor, weights: torch.Tensor, floor: float = 1e-12
) -> torch.Tensor:
    """Σ_k w_k F_k τ_k / Σ_k w_k F_k per entry, F_k a diagonal Fisher: Fisher merging (Matena &
    Raffel 2022, "Merging Models with Fisher-Weighted Averaging", eq. 3). The floor keeps entries
    where every Fisher vanishes at the plain weighted mean."""
    w = _bcast(weights, tasks) * (fishers + floor)
    return (w * tasks).sum(0) / w.sum(0)


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1−α)·diag(G): RegMean's scaling of the off-diagonal inner products (Jin et al. 2023, §3.2)."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def regmean_merge(tasks: torch.Tensor, grams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"):
    for a linear layer y = W x with per-task weights W_k (out, in) and input Gram matrices
    G_k = X_kᵀ X_k (in, in), the W minimising Σ_k w_k ||X_k Wᵀ − X_k W_kᵀ||² is
    W = (Σ_k w_k W_k G_k)(Σ_k w_k G_k)⁻¹ (pseudo-inverse where singular)."""
    wg = grams * _bcast(weights, grams)
    rhs = torch.einsum("koi,kij->oj", tasks, wg)
    return rhs @ torch.linalg.pinv(wg.sum(0), hermitian=True)
