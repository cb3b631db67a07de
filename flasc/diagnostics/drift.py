"""Client drift in a round (drift_stats): how far apart the uploaded updates are and how much they
conflict, on the updates the server receives (after the upload chain), kept clients only.
docs/diagnostics.md ("Client drift") defines each drift_* metric and how to read it; the
functions below compute them (pairwise statistics need two clients).
"""

from __future__ import annotations

import math

import torch

import merging
from flasc.round import RoundCallback

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
    out = {
        "drift_norm_cv": float(norms.std(unbiased=False)) / mean_norm if mean_norm > 0 else 0.0,
        "drift_effective_rank": effective_rank(stacked),
    }
    if k < 2:
        return out
    cos = cosine_matrix(stacked)
    pairs = cos[torch.triu_indices(k, k, offset=1).unbind()]
    distance = (stacked.double() - stacked.double().mean(0)).norm(dim=1) / max(mean_norm, EPS)
    conflicts, shared = sign_conflict(stacked)
    out.update(
        {
            "drift_cosine_mean": float(pairs.mean()),
            "drift_cosine_min": float(pairs.min()),
            "drift_distance_mean": float(distance.mean()),
            "drift_distance_max": float(distance.max()),
            "drift_distance_by_client": {str(c): float(d) for c, d in zip(client_ids, distance)},
            "drift_sign_conflict": conflicts / shared if shared else 0.0,
        }
    )
    if layer_updates:
        per_layer, total_conflicts, total_shared = {}, 0, 0
        for name, blocks in layer_updates.items():
            c, s = sign_conflict(blocks)
            per_layer[name] = c / s if s else 0.0
            total_conflicts, total_shared = total_conflicts + c, total_shared + s
        out["drift_sign_conflict_product"] = total_conflicts / total_shared if total_shared else 0.0
        out["drift_sign_conflict_product_by_layer"] = per_layer
    return out


class Drift(RoundCallback):
    """drift_stats as a part of the round: the statistics of the updates the server received. The
    LoRA layers' weight updates are taken against the one shared download, so they are left out
    with tiers (downloads differ), where clients start from their own state, and for LoRA on
    convolutions."""

    def __init__(self, flat, pairs, layers: bool):
        self.flat, self.pairs, self.layers = flat, pairs, layers and bool(pairs)

    def before_step(self, rnd, reduced, server_state) -> dict:
        updates = reduced.updates
        layers = {}
        if self.layers:
            blocks = merging.ProductSpace(self.flat, self.pairs).blocks(updates, reduced.plan.starts[0])
            layers = {pair.name: blocks[pair.name] for pair in self.pairs}
        return drift([u.delta for u in updates], [u.client_id for u in updates], layers)
