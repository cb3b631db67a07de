"""The exchanged state: all trainable tensors of the one resident model as a flat fp32 vector.

Server and clients hold flat vectors; a client is "loaded" by copying its vector into the model's
trainable parameters in place, so the base model is never copied.
"""

from __future__ import annotations

import torch


class FlatParams:
    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)

    def read(self) -> torch.Tensor:
        """A flat fp32 copy of the trainable parameters."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        """Copy a flat vector into the trainable parameters, in place."""
        for p, chunk in zip(self.params, flat.split(self.numels)):
            p.copy_(chunk.view_as(p))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like each trainable parameter."""
        return [chunk.view_as(p) for p, chunk in zip(self.params, flat.split(self.numels))]

    def named(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.split(flat)))


class LoraPair:
    """One LoRA-adapted layer: ΔW = scaling · B A, with A (r, in) and B (out, r).

    `a` / `b` are the names of the factors in FlatParams (a is None when A is frozen, then
    `frozen_a` holds its fixed value).
    """

    def __init__(self, name: str, module, flat: FlatParams):
        self.name = name
        self.module = module
        a_param = module.lora_A["default"].weight
        self.a = f"{name}.lora_A.default.weight" if a_param.requires_grad else None
        self.b = f"{name}.lora_B.default.weight"
        self.frozen_a = None if a_param.requires_grad else a_param.detach()
        self.scaling = float(module.scaling["default"])
        self.rank = a_param.shape[0]
        if self.b not in flat.names or (self.a is not None and self.a not in flat.names):
            raise ValueError(f"LoRA factors of {name} are not among the trainable tensors")


def lora_pairs(model: torch.nn.Module, flat: FlatParams) -> list[LoraPair]:
    """Every LoRA-adapted layer of a peft model, in module order (empty without LoRA)."""
    from peft.tuners.lora import LoraLayer

    return [
        LoraPair(name, module, flat)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    ]


class ResidentModel:
    """The one model a process holds, with what a forward pass on it needs: its trainable tensors
    as a flat vector (`flat`), the device and the precision. Clients, statistics and evaluation take
    this, never the whole run."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool):
        self.model, self.device, self.bf16 = model, device, bf16
        self.flat = FlatParams(model)
