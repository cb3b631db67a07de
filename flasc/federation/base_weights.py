"""Server-side changes to the frozen base weights: what FedEx-LoRA's residuals and FLoRA's merged
stacks add to each LoRA-adapted layer's W0.

The resident model's base weight is always set to W0 + delta (the original W0 is kept), never
incremented in place, so a resumed run holds bit for bit the weights of an uninterrupted one.
The delta is part of the server state (checkpointed) and is saved next to the adapter
(`base_delta.pt`, read back by models.load_trained), so the saved model is the evaluated one.

What a client downloads to catch up on increments it missed is counted by `catch_up_values`
(docs/algorithms.md, "What is sent", gives the rule).
"""

from __future__ import annotations

from pathlib import Path

import torch

FILE = "base_delta.pt"


def base_weight(module) -> torch.nn.Parameter:
    return module.get_base_layer().weight


def as_weight(module, delta: torch.Tensor) -> torch.Tensor:
    """An (out, in) matrix in the base weight's layout (GPT-2's Conv1D stores (in, out))."""
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


class BaseDelta:
    def __init__(self, pairs):
        self.pairs = {pair.name: pair for pair in pairs}
        self.original = {name: base_weight(p.module).detach().clone() for name, p in self.pairs.items()}
        self.delta = {
            name: torch.zeros(as_weight(p.module, w).shape, dtype=torch.float32, device=w.device)
            for (name, p), w in zip(self.pairs.items(), self.original.values())
        }
        self.increments: list[list[int]] = []  # per increment: factored values of each layer

    def add(self, increments: dict[str, torch.Tensor], factored_values: dict[str, int]) -> None:
        """Fold one round's (out, in) increment per layer into the base weights."""
        for name, inc in increments.items():
            self.delta[name] += inc.to(self.delta[name].dtype)
        self.increments.append([int(factored_values[name]) for name in self.pairs])
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, pair in self.pairs.items():
            w = base_weight(pair.module)
            w.copy_((self.original[name].float() + as_weight(pair.module, self.delta[name])).to(w.dtype))

    def catch_up_values(self, held: int) -> int:
        """Values a client holding the first `held` increments downloads to hold them all."""
        missed = self.increments[held:]
        if not missed:
            return 0
        return sum(min(self.delta[name].numel(), sum(inc[i] for inc in missed)) for i, name in enumerate(self.pairs))

    def state_dict(self) -> dict:
        return {
            "delta": {k: v.detach().cpu().clone() for k, v in self.delta.items()},
            "increments": [list(x) for x in self.increments],
        }

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["delta"].items():
            self.delta[name] = value.to(self.delta[name].device, torch.float32)
        self.increments = [list(x) for x in state["increments"]]
        self.apply()

    def save(self, folder: Path) -> None:
        torch.save({k: v.detach().cpu() for k, v in self.delta.items()}, Path(folder) / FILE)


def load_into(model, folder: Path) -> None:
    """Add a saved base delta (if the folder has one) to a loaded peft model's base weights."""
    path = Path(folder) / FILE
    if not path.is_file():
        return
    deltas = torch.load(path, map_location="cpu", weights_only=True)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            w = base_weight(modules[name])
            w.add_(as_weight(modules[name], delta).to(w.device, w.dtype))
