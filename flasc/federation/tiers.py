"""What each client downloads, trains and uploads in a round: one plan per system tier.

Without heterogeneity there is one plan for everybody (the FLASC masks). With `tiers: T >= 2`
clients are split into T tiers (client_id mod T, or a seeded balanced random assignment) and each
tier gets a rank (syshet rank: the first 4^i components; rankl1: the 4^i strongest of each layer)
or densities (syshet density) as docs/privacy-and-heterogeneity.md describes. Rank tiers train and
send only their components (their other entries are not on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flasc.federation import communication
from flasc.options import ConfigError
from flasc.runtime import seeding

options = ("tiers", "syshet", "tier_assignment", "clients", "server_freeze", "client_freeze")


def tier_rank(tier: int) -> int:
    """The LoRA rank of rank tier `tier` (syshet rank and rankl1): 4^tier."""
    return 4**tier


def check(cfg) -> None:
    """Tiers need LoRA adapters, one shared merge space, their own masks, and ranks that fit."""
    if cfg.tiers <= 1:
        return
    if cfg.lora_rank <= 0:
        raise ConfigError(
            f"tiers: heterogeneity tiers need LoRA adapters; expected lora_rank >= 1 (got {cfg.lora_rank})"
        )
    if cfg.merge_space != "factors":
        raise ConfigError(
            "tiers: clients of different tiers start from different downloads; expected merge_space: factors"
        )
    if cfg.server_freeze:
        raise ConfigError("tiers: each tier has its own download mask; expected server_freeze: false")
    if cfg.syshet in ("rank", "rankl1"):
        top = tier_rank(cfg.tiers - 1)
        if cfg.lora_rank < top:
            raise ConfigError(
                f"lora_rank: {cfg.tiers} rank tiers train ranks 1..{top}; expected "
                f"lora_rank >= {top} (got {cfg.lora_rank})"
            )
        if cfg.dl_density < 1 or cfg.ul_density < 1:
            raise ConfigError(
                "syshet: rank tiers send whole components; expected dl_density: 1 and "
                "ul_density: 1 (or syshet: density)"
            )


@dataclass
class Plan:
    download: torch.Tensor | None  # mask of what the client receives (None: everything)
    train: torch.Tensor | None  # gradient mask during local training (None: everything)
    restrict: torch.Tensor | None  # entries the client can send at all (None: everything)
    ul_density: float  # upload top-k density over what it can send
    dl_bytes: int  # bytes of one download


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
            rank = tier_rank(i)
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
            out.append(Plan(mask, train, None, ul_density * scale, communication.message_bytes(n, int(mask.sum()))))
    return out
