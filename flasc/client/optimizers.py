"""Client optimizers by name and the gradient terms a client adds after its backward pass.

A client's optimizer starts fresh for every client every round (it has no state to keep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from flasc.federation.optimizers import AdaptiveFedOpt

Params = Iterable[torch.nn.Parameter]


@dataclass(frozen=True)
class OptimizerOptions:
    """client_momentum (sgd), client_beta1, client_beta2, client_eps, client_weight_decay (the
    FLASC seeds' momentum, torch's defaults, no decay)."""

    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


# Client optimizers start fresh for every client every round. sgd: client_momentum (0.9, as in
# the FLASC seeds; 0: plain SGD); adam, adamw and adagrad: torch's, with the client_* options above
# (adagrad: its own ε; adam's weight decay is added to the gradient, adamw's decoupled, Loshchilov &
# Hutter 2019); yogi: Zaheer et al. (2018) with their ε = 1e-3 and the betas above.
CLIENT_OPTIMIZERS: dict[str, Callable[[Params, float, OptimizerOptions], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, o: torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda params, lr, o: torch.optim.Adam(
        params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    ),
    "adamw": lambda params, lr, o: torch.optim.AdamW(
        params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    ),
    "adagrad": lambda params, lr, o: torch.optim.Adagrad(params, lr=lr, weight_decay=o.weight_decay),
    "yogi": lambda params, lr, o: AdaptiveFedOpt(params, lr, "yogi", beta1=o.beta1, beta2=o.beta2, tau=1e-3),
}


def proximal_grad_(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> None:
    """FedProx (Li et al. 2020): add the gradient of (mu/2)·||w − w_global||², i.e. mu·(w − w_global).

    The term covers every trained tensor, so one that the data loss did not reach this step
    (grad None) gets the proximal gradient alone."""
    for p, anchor in zip(params, anchors):
        prox = (p.detach() - anchor) * mu
        if p.grad is None:
            p.grad = prox
        else:
            p.grad.add_(prox)


def adjust_gradients(params: list[torch.Tensor], grad_offset, anchors, mu: float, grad_mask) -> None:
    """The gradient terms a client adds after its backward pass, in this order: SCAFFOLD's offset
    (c − c_i), FedProx's pull towards the download (anchors), then the client_freeze / tier mask
    (train only the entries it may change)."""
    if grad_offset is not None:
        for p, offset in zip(params, grad_offset):
            p.grad = offset.clone() if p.grad is None else p.grad.add_(offset)
    if anchors is not None:
        proximal_grad_(params, anchors, mu)
    if grad_mask is not None:
        for p, m in zip(params, grad_mask):
            if p.grad is not None:
                p.grad.mul_(m)
