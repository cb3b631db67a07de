"""Server optimizers by name, and the server learning-rate schedule.

The server treats the aggregated client update g_t (the pseudo-gradient) as a gradient: it sets
server.grad = g_t and calls step(). One code path serves every server optimizer; their update
rules are written out once, for users, in docs/aggregation.md ("Server optimizers").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from flasc.options import ConfigError

Params = Iterable[torch.nn.Parameter]


class AdaptiveFedOpt(torch.optim.Optimizer):
    """FedAdam / FedAdagrad / FedYogi of Reddi et al. (2021): one class, the second moment differs."""

    MODES = ("adam", "adagrad", "yogi")

    def __init__(
        self, params: Params, lr: float, mode: str, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, tau=tau))
        self.mode = mode

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, b1, b2, tau = group["lr"], group["beta1"], group["beta2"], group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                g2 = g * g
                if self.mode == "adam":
                    v.mul_(b2).add_(g2, alpha=1 - b2)
                elif self.mode == "adagrad":
                    v.add_(g2)
                else:  # yogi: additive, sign-controlled change of v
                    v.sub_((1 - b2) * g2 * torch.sign(v - g2))
                p.sub_(lr * m / (v.sqrt() + tau))


def _server_adaptive(mode: str):
    return lambda params, cfg: AdaptiveFedOpt(params, cfg.server_lr, mode, cfg.beta1, cfg.beta2, cfg.tau)


SERVER_OPTIMIZERS: dict[str, Callable[[Params, object], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.server_lr),
    "sgdm": lambda params, cfg: torch.optim.SGD(params, lr=cfg.server_lr, momentum=cfg.beta1),
    "adam": _server_adaptive("adam"),
    "adagrad": _server_adaptive("adagrad"),
    "yogi": _server_adaptive("yogi"),
    "adamw": lambda params, cfg: torch.optim.AdamW(
        params, lr=cfg.server_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.tau, weight_decay=cfg.weight_decay
    ),
}

# What beta2, tau and weight_decay mean when basic_config.yaml leaves them null: Reddi et al.'s
# β2 = 0.99 and τ = 1e-3 for the FedOpt family, torch's own AdamW defaults (β2 0.999, eps 1e-8,
# weight decay 0.01) for adamw. Optimizers that do not read an option still record the generic value.
_GENERIC_DEFAULTS = {"beta2": 0.99, "tau": 1e-3}
_OWN_DEFAULTS = {"adamw": {"beta2": 0.999, "tau": 1e-8, "weight_decay": 0.01}}


def server_defaults(name: str) -> dict[str, float]:
    """The defaults of beta2, tau (and weight_decay, where the optimizer has it) for server_opt `name`."""
    return {**_GENERIC_DEFAULTS, **_OWN_DEFAULTS.get(name, {})}


options = ("server_opt", "server_lr", "beta1", "beta2", "tau", "weight_decay", "server_schedule", "server_rounds")


def resolve_defaults(values: dict) -> dict:
    """beta2, tau and weight_decay left null take the server optimizer's own defaults, so the saved
    config records the values a run used; weight_decay only where the optimizer has one."""
    defaults = server_defaults(values["server_opt"])
    if values["weight_decay"] is not None and "weight_decay" not in defaults:
        raise ConfigError(
            f"weight_decay: decoupled weight decay is part of server_opt adamw; "
            f"server_opt {values['server_opt']} has none; expected null"
        )
    return {**values, **{k: v for k, v in defaults.items() if values[k] is None}}


def server_schedule(optimizer: torch.optim.Optimizer, kind: str, rounds: int):
    """constant, or cosine: round t (from 0) uses lr · ½(1 + cos(π t / rounds))."""
    if kind == "constant":
        factor = lambda t: 1.0  # noqa: E731
    else:
        factor = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, rounds) / max(rounds, 1)))  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


SCHEDULES = ("constant", "cosine")
