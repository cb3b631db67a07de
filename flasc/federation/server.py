"""The server side of a run: the global trainable vector, its optimizer and learning-rate schedule,
and the download masks that carry over from one round to the next.

One code path serves every server optimizer (optimizers.py): the round's pseudo-gradient is written
to `params.grad` and the optimizer steps. `state_dict()` is everything a checkpoint needs of it.
"""

from __future__ import annotations

import copy

import torch

from flasc.federation import communication
from flasc.federation.optimizers import SERVER_OPTIMIZERS, server_schedule


class ServerState:
    def __init__(self, initial: torch.Tensor, cfg):
        self.cfg = cfg
        self.params = torch.nn.Parameter(initial)
        self.optimizer = SERVER_OPTIMIZERS[cfg.server_opt]([self.params], cfg)
        self.schedule = server_schedule(self.optimizer, cfg.server_schedule, cfg.server_rounds)
        self.frozen_mask: torch.Tensor | None = None  # server_freeze: the download mask kept from round 1
        self.eval_mask: torch.Tensor | None = None  # the last round's download mask (without tiers)
        self.tier_masks: list = []  # the last round's download mask of every tier

    @property
    def lr(self) -> float:
        """The learning rate of the coming step."""
        return self.optimizer.param_groups[0]["lr"]

    def download_mask(self, rnd: int, density: float, freeze: bool) -> torch.Tensor | None:
        """Global top-k of |server| (None = dense). freeze (server_freeze): round 0 is dense, the mask
        computed at round 1 is kept for the rest of the run (as in the FLASC seeds; kept by
        keep_downloads once round 1 is done, so planning changes nothing)."""
        if freeze:
            if rnd == 0:
                return None
            if self.frozen_mask is not None:
                return self.frozen_mask
            return communication.topk_mask(self.params.detach(), density)
        if density >= 1:
            return None
        return communication.topk_mask(self.params.detach(), density)

    def keep_downloads(self, rnd: int, plans: list) -> None:
        """After the round's server step: its download masks, for evaluation (eval_masked, each
        tier's model) and, with server_freeze, the mask the rest of the run keeps."""
        if self.cfg.server_freeze and rnd >= 1 and self.frozen_mask is None:
            self.frozen_mask = plans[0].download
        self.eval_mask = plans[0].download if len(plans) == 1 else None
        self.tier_masks = [p.download for p in plans] if len(plans) > 1 else []

    def masked(self, mask: torch.Tensor | None) -> torch.Tensor:
        """What a client with this download mask receives (a copy: clients never alias the server)."""
        server = self.params.detach()
        return server.clone() if mask is None else server * mask

    def step(self, pseudo_grad: torch.Tensor) -> None:
        """One server optimizer step on the pseudo-gradient, then the schedule's."""
        self.optimizer.zero_grad(set_to_none=True)
        self.params.grad = pseudo_grad.to(self.params.dtype)
        self.optimizer.step()
        self.schedule.step()

    def copy(self) -> ServerState:
        """An independent copy, optimizer moments and schedule included (the shadow strategies step copies)."""
        other = ServerState(self.params.detach().clone(), self.cfg)
        other.load_state_dict(copy.deepcopy(self.state_dict()))
        return other

    def state_dict(self) -> dict:
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {
            "server": cpu(self.params),
            "server_opt": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "frozen_mask": cpu(self.frozen_mask),
            "eval_mask": cpu(self.eval_mask),
            "tier_masks": [cpu(m) for m in self.tier_masks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Tensors go to the parameters' device (a checkpoint is read on the CPU); torch moves the
        optimizer state there itself."""
        device = self.params.device
        to_device = lambda t: None if t is None else t.to(device)  # noqa: E731
        with torch.no_grad():
            self.params.copy_(state["server"].to(device))
        self.optimizer.load_state_dict(state["server_opt"])
        self.schedule.load_state_dict(state["schedule"])
        self.frozen_mask, self.eval_mask = to_device(state["frozen_mask"]), to_device(state["eval_mask"])
        self.tier_masks = [to_device(m) for m in state["tier_masks"]]
