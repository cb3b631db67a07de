"""Client drift in a round: how far apart the uploaded updates are and how much they conflict.

Computed on the updates the server receives (after the upload chain), kept clients only, when
`drift_stats: true` (the default); logged in metrics.jsonl and TensorBoard as drift_*:

    drift_cosine_mean, drift_cosine_min   pairwise cosine similarity of the flat updates (pairs k < l;
                                          a zero update has cosine 0 with everything)
    drift_norm_cv                         spread of the update norms: std / mean (population std)
    drift_distance_mean, drift_distance_max
                                          each client's distance from the mean update, ||τ_k − τ̄||,
                                          divided by the mean update norm; per client in
                                          drift_distance_by_client (metrics.jsonl only)
    drift_sign_conflict                   of the entries where at least two clients send a non-zero
                                          value, the share where both signs occur (factor space)
    drift_sign_conflict_product           the same on the LoRA layers' weight updates
                                          δW_k = s·(B A − B_k A_k) (product space), pooled over layers;
                                          per layer in drift_sign_conflict_product_by_layer
    drift_effective_rank                  exp of the entropy of the normalised singular values of the
                                          stacked updates (Roy & Vetterli 2007): 1 when all updates are
                                          parallel, K when they are orthogonal and of equal norm

Pairwise statistics need two clients: with one, only the norm and rank statistics are logged.

Speed of convergence (`convergence`, in summary.json): the first evaluated round at which the
validation primary metric reaches `target_accuracy`, with the megabytes communicated and the
seconds spent (training and evaluation, this and earlier rounds) until then, null when never
reached; and `val_auc`, the area under the validation curve (trapezoids over the evaluated rounds)
divided by the rounds it spans: the mean validation level over training, 1 at best.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-12


def cosine_matrix(stacked: torch.Tensor) -> torch.Tensor:
    """(K, n) -> (K, K) cosine similarities; rows of norm 0 give 0."""
    x = stacked.double()
    norms = x.norm(dim=1)
    unit = x / norms.clamp_min(EPS).unsqueeze(1)
    return unit @ unit.T


def sign_conflict(stacked: torch.Tensor) -> tuple[int, int]:
    """(entries where both signs occur, entries where at least two clients are non-zero) of (K, ...)."""
    x = stacked.reshape(stacked.shape[0], -1)
    shared = (x != 0).sum(0) >= 2
    both = (x > 0).any(0) & (x < 0).any(0)
    return int((both & shared).sum()), int(shared.sum())


def effective_rank(stacked: torch.Tensor) -> float:
    """exp(−Σ p_i log p_i), p = singular values / their sum, of the (K, n) matrix (via its K × K Gram)."""
    x = stacked.double()
    eig = torch.linalg.eigvalsh(x @ x.T).clamp_min(0)
    sv = eig.sqrt()
    total = float(sv.sum())
    if total <= 0:
        return 0.0
    p = sv[sv > 0] / total
    return math.exp(-float((p * p.log()).sum()))


def drift(updates: list[torch.Tensor], client_ids: list[int], layer_updates: dict[str, torch.Tensor]) -> dict:
    """The statistics above for one round. updates: flat, one per client (client order);
    layer_updates: LoRA layer name -> (K, out, in) weight updates (empty without LoRA)."""
    stacked = torch.stack(updates)
    k = stacked.shape[0]
    norms = stacked.double().norm(dim=1)
    mean_norm = float(norms.mean())
    out = {"drift_norm_cv": float(norms.std(unbiased=False)) / mean_norm if mean_norm > 0 else 0.0,
           "drift_effective_rank": effective_rank(stacked)}
    if k < 2:
        return out
    cos = cosine_matrix(stacked)
    pairs = cos[torch.triu_indices(k, k, offset=1).unbind()]
    distance = (stacked.double() - stacked.double().mean(0)).norm(dim=1) / max(mean_norm, EPS)
    conflicts, shared = sign_conflict(stacked)
    out.update({
        "drift_cosine_mean": float(pairs.mean()),
        "drift_cosine_min": float(pairs.min()),
        "drift_distance_mean": float(distance.mean()),
        "drift_distance_max": float(distance.max()),
        "drift_distance_by_client": {str(c): float(d) for c, d in zip(client_ids, distance)},
        "drift_sign_conflict": conflicts / shared if shared else 0.0,
    })
    if layer_updates:
        per_layer, total_conflicts, total_shared = {}, 0, 0
        for name, blocks in layer_updates.items():
            c, s = sign_conflict(blocks)
            per_layer[name] = c / s if s else 0.0
            total_conflicts, total_shared = total_conflicts + c, total_shared + s
        out["drift_sign_conflict_product"] = total_conflicts / total_shared if total_shared else 0.0
        out["drift_sign_conflict_product_by_layer"] = per_layer
    return out


def convergence(evals: list[dict], primary: str, target: float | None) -> dict:
    """val_auc, and with a target the rounds / megabytes / seconds to reach it (None: never)."""
    xs, ys = [e["round"] for e in evals], [e[f"val_{primary}"] for e in evals]
    if len(xs) == 1 or xs[-1] == xs[0]:
        auc = ys[-1]
    else:
        area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
        auc = area / (xs[-1] - xs[0])
    out = {f"val_{primary}_auc": auc}
    if target is None:
        return out
    reached = next((e for e in evals if e[f"val_{primary}"] >= target), None)
    out.update({"target_accuracy": target,
                "rounds_to_target": None if reached is None else reached["round"],
                "megabytes_to_target": None if reached is None else
                (reached["bytes_up_total"] + reached["bytes_down_total"]) / 1e6,
                "seconds_to_target": None if reached is None else reached["elapsed_seconds"]})
    return out
