"""What each client downloads, trains and uploads in a round: one plan per system tier.

Without heterogeneity there is one plan for everybody (the FLASC masks). With `tiers: T >= 2`
clients are split into T tiers (client_id mod T, or a seeded balanced random assignment) and tier
i of T gets, as in FLASC's heterogeneity experiments (tier i moves about 1/4^(T-1-i) of the LoRA
values under either scheme, so rank and density tiers are compared at equal budgets):
- syshet rank:   LoRA rank 4^i, the first 4^i components (rows of A, columns of B); the head whole.
- syshet rankl1: LoRA rank 4^i, the 4^i components of largest norm ||B[:, j]||·||A[j, :]|| in
                 each layer (one choice per layer for A and B together, so no tier holds half a
                 component); the head whole.
- syshet density: download and upload densities dl_density_t / 4^(T-1-i) and ul_density_t /
                 4^(T-1-i) (the top tier communicates at the configured densities); download
                 top-k over the LoRA factors with the head always sent, upload top-k over everything.
Rank tiers train and send only their components (their other entries are not on the device).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import communication
import seeding


@dataclass
class Plan:
    download: torch.Tensor | None   # mask of what the client receives (None: everything)
    train: torch.Tensor | None      # gradient mask during local training (None: everything)
    restrict: torch.Tensor | None   # entries the client can send at all (None: everything)
    ul_density: float               # upload top-k density over what it can send
    dl_bytes: int                   # bytes of one download


def assign(cfg) -> np.ndarray:
    """Tier of every client."""
    ids = np.arange(cfg.clients)
    if cfg.tiers <= 1:
        return np.zeros(cfg.clients, dtype=np.int64)
    if cfg.tier_assignment == "random":  # balanced: a seeded shuffle, then round robin
        ids = seeding.numpy_rng(cfg.seed, "tiers").permutation(cfg.clients)
        out = np.empty(cfg.clients, dtype=np.int64)
        out[ids] = np.arange(cfg.clients) % cfg.tiers
        return out
    return ids % cfg.tiers


def component_mask(flat, pairs, keep: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Flat mask keeping, per LoRA layer, the components flagged in keep[layer] (bool, length r),
    and every non-LoRA entry."""
    mask = torch.ones(flat.numel, dtype=torch.bool, device=device)
    named = flat.named(mask)
    for pair in pairs:
        k = keep[pair.name].to(mask.device)
        named[pair.b][:, ~k] = False
        if pair.a is not None:
            named[pair.a][~k, :] = False
    return mask


def _rank_keep(server: torch.Tensor, flat, pairs, rank: int, by_norm: bool) -> dict[str, torch.Tensor]:
    server = flat.named(server)
    keep = {}
    for pair in pairs:
        r = pair.rank
        chosen = torch.zeros(r, dtype=torch.bool)
        if by_norm:
            a = pair.frozen_a if pair.a is None else server[pair.a]
            strength = server[pair.b].norm(dim=0) * a.norm(dim=1)
            chosen[torch.topk(strength.cpu(), rank, sorted=False).indices] = True
        else:
            chosen[:rank] = True
        keep[pair.name] = chosen
    return keep


def rank_mask(flat, pairs, rank: int, device) -> torch.Tensor:
    """Flat mask of the first `rank` components of every LoRA layer, and every non-LoRA entry."""
    keep = {}
    for pair in pairs:
        keep[pair.name] = torch.arange(pair.rank) < rank
    return component_mask(flat, pairs, keep, device)


def lora_entries(flat, pairs, device) -> torch.Tensor:
    mask = torch.zeros(flat.numel, dtype=torch.bool, device=device)
    named = flat.named(mask)
    for pair in pairs:
        named[pair.b][:] = True
        if pair.a is not None:
            named[pair.a][:] = True
    return mask


def plans(cfg, server_state, flat, pairs, rnd: int, dl_density: float, ul_density: float) -> list[Plan]:
    """The round's plan of every tier (one plan without tiers), from the server as it is now.
    flat: the layout of the trainable vector; pairs: its LoRA layers."""
    n, server = flat.numel, server_state.params.detach()
    if cfg.tiers <= 1:
        mask = server_state.download_mask(rnd, dl_density, cfg.server_freeze)
        sent = n if mask is None else int(mask.sum())
        train = mask if (cfg.client_freeze and mask is not None) else None
        return [Plan(mask, train, None, ul_density, communication.message_bytes(n, sent))]
    out = []
    for i in range(cfg.tiers):
        if cfg.syshet in ("rank", "rankl1"):
            rank = 4 ** i
            keep = _rank_keep(server, flat, pairs, rank, by_norm=cfg.syshet == "rankl1")
            mask = component_mask(flat, pairs, keep, server.device)
            sent = int(mask.sum())
            # the structure is implied by the rank; rankl1 also names its components (int32 each)
            index_bytes = communication.INDEX_BYTES * rank * len(pairs) if cfg.syshet == "rankl1" else 0
            out.append(Plan(mask, mask, mask, 1.0, communication.VALUE_BYTES * sent + index_bytes))
        else:
            scale = 4.0 ** -(cfg.tiers - 1 - i)
            lora = lora_entries(flat, pairs, server.device)
            top = communication.topk_mask(server[lora], dl_density * scale)
            mask = ~lora
            mask[lora] = top
            train = mask if cfg.client_freeze else None
            out.append(Plan(mask, train, None, ul_density * scale,
                            communication.message_bytes(n, int(mask.sum()))))
    return out
