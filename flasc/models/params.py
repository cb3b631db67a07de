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


class FixedB(torch.nn.Module):
    """peft's lora_B weight as B·R: B (out × r, orthonormal columns) fixed, R (r × r) the trained
    tensor (the parametrization's `original`), so that peft's forward, merge and saving see B·R."""

    def __init__(self, fixed: torch.Tensor):
        super().__init__()
        self.register_buffer("fixed", fixed)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.fixed @ r

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fixed.T @ weight  # B has orthonormal columns: Bᵀ(B R) = R


def fixed_b(module) -> torch.Tensor | None:
    """A LoRA layer's fixed B (Fed-SB), or None for a plain one."""
    from torch.nn.utils import parametrize

    linear = module.lora_B["default"]
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    return linear.parametrizations.weight[0].fixed


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


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every LoRA-adapted layer of a peft model, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def lora_pairs(model: torch.nn.Module, flat: FlatParams) -> list[LoraPair]:
    """Every LoRA-adapted layer of a peft model whose factors train, in module order (empty without
    LoRA). A layer whose B is parametrized (Fed-SB's fixed B times its trained R) is not a pair: its
    trained tensor is R, which every algorithm handles as it handles a head's."""
    from torch.nn.utils import parametrize

    return [
        LoraPair(name, module, flat)
        for name, module in lora_modules(model)
        if not parametrize.is_parametrized(module.lora_B["default"], "weight")
    ]


class ResidentModel:
    """The one model a process holds, with what a forward pass on it needs: its trainable tensors
    as a flat vector (`flat`), the device and the precision. Clients, statistics and evaluation take
    this, never the whole run."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool):
        self.model, self.device, self.bf16 = model, device, bf16
        self.flat = FlatParams(model)
