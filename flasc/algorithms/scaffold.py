"""SCAFFOLD (algorithm: scaffold)."""

from __future__ import annotations

from dataclasses import replace

import torch

from flasc.algorithms.base import FedAvg
from flasc.client.local import TrainingExtras
from flasc.federation.communication import VALUE_BYTES
from flasc.options import ConfigError


class Scaffold(FedAvg):
    """SCAFFOLD: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020, Algorithm 1 with option II, on every trainable tensor (LoRA factors and
    head). Each local gradient g becomes g − c_i + c; after K local steps at client_lr η, c_i⁺ = c_i
    − c + (x − y)/(K η); the client sends Δy and Δc_i = c_i⁺ − c_i; the server steps on the mean Δy
    (server_lr is η_g) and sets c ← c + (|S|/N)·mean Δc_i; x and c go down, Δy and Δc up.
    docs/algorithms.md ("What is sent") gives its bytes each way. The derivation assumes plain SGD,
    which its config sets (client_momentum: 0); with momentum or an adaptive local optimizer the
    correction is added to the gradient before the optimizer (approximate, as it is everywhere it
    is used so)."""

    name = "scaffold"
    options = (*FedAvg.options, "client_lr")
    needs_lora = False
    rank_tiers = False

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.ul_density < 1 or cfg.ul_density_decay < 1:
            raise ConfigError(
                "ul_density: SCAFFOLD's control variates are computed from the whole local change; "
                "expected ul_density: 1 and ul_density_decay: 1 with algorithm scaffold"
            )
        if cfg.l2_clip_norm > 0:
            raise ConfigError(
                "l2_clip_norm: SCAFFOLD moves x by the clients' updates and c_i by their whole local "
                "change; a clipped update would move x by less than c_i accounts for; expected "
                "l2_clip_norm: 0 with algorithm scaffold"
            )

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.state_numel = flat.numel
        self.control = torch.zeros_like(server_state.params.detach())

    def prepare(self, rnd, job, state):
        c_i = torch.zeros_like(self.control) if state is None else state.to(self.control.device)
        plan = replace(job.plan, dl_bytes=2 * job.plan.dl_bytes)
        return replace(
            job, plan=plan, state=c_i, extras=TrainingExtras(grad_offset=self.flat.split(self.control - c_i))
        )

    def finish(self, job, params, metrics):
        c_i, steps = job.state, metrics["steps"]
        new = c_i if steps == 0 else c_i - self.control + (job.start - params) / (steps * self.cfg.client_lr)
        return new, {"control": new - c_i}, VALUE_BYTES * self.flat.numel

    def after_step(self, server_state, kept, jobs, rnd):
        deltas = torch.stack(
            [r.extra["control"].to(self.control.device) for r in sorted(kept, key=lambda r: r.client_id)]
        )
        self.control += len(kept) / self.cfg.clients * deltas.mean(0)
        return {"control_norm": float(self.control.norm())}

    def state_dict(self):
        return {**super().state_dict(), "control": self.control.detach().cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.control = state["control"].to(self.control.device)
