"""Client and server optimizers by name.

The server treats the aggregated client update as a gradient: it sets server.grad to the
pseudo-gradient and calls step(), one code path for every server optimizer. Server sgd with
lr 1 is FedAvg: w <- w - mean(update) = mean of the client models (for dense download).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

Params = Iterable[torch.nn.Parameter]

CLIENT_OPTIMIZERS: dict[str, Callable[[Params, float], torch.optim.Optimizer]] = {
    # momentum 0.9 as in the FLASC seeds; state starts fresh for every client every round
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}

SERVER_OPTIMIZERS: dict[str, Callable[[Params, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    # bias-corrected Adam (betas 0.9, 0.999; eps 1e-8) on the pseudo-gradient
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
