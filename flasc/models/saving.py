"""Saving the trained global model (peft's adapter format, or the trainable tensors) and loading it back."""

from __future__ import annotations

from pathlib import Path

import torch

from flasc.federation import base_weights
from flasc.models.build import build_base, float32_trained, prepared_for_kbit, return_freed_memory, with_lm_parts

FULL_STATE = "trainable.pt"


def save_trained(model, folder: Path) -> None:
    """LoRA: peft's save_pretrained (adapter + head); otherwise the trainable tensors."""
    from peft import PeftModel

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        if hasattr(model, "flasc_initial_adapter"):
            _save_for_original_base(model, folder)
        else:
            model.save_pretrained(str(folder), state_dict=_plain_state(model))
        _canonical_adapter_config(folder / "adapter_config.json")
    else:
        state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(state, folder / FULL_STATE)


def _plain_state(model) -> dict:
    """The model's state with every parametrized weight as its value (Fed-SB's lora_B: B·R), under
    the weight's own name: the adapter a plain peft LoRA model loads."""
    from torch.nn.utils import parametrize

    state = model.state_dict()
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            prefix = f"{name}.parametrizations."
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            for tensor in module.parametrizations:
                state[f"{name}.{tensor}"] = getattr(module, tensor).detach()
    return state


def _save_for_original_base(model, folder: Path) -> None:
    """PiSSA / OLoRA trained on the residual base W − s·B₀A₀: peft's conversion saves the rank-2r
    adapter [B | −B₀]·[A ; A₀] (its ΔW = s·(BA − B₀A₀)), which loads onto the original base W."""
    import tempfile
    import warnings

    config = model.peft_config["default"]
    initial = dict(model.state_dict())
    initial.update({f"{n}": p for n, p in model.flasc_initial_adapter.items()})
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        start = Path(scratch) / "initial"
        init = config.init_lora_weights
        config.init_lora_weights = True  # as peft asks: the initial adapter is read as a plain LoRA one
        try:
            model.save_pretrained(str(start), state_dict=initial)
        finally:
            config.init_lora_weights = init
        with warnings.catch_warnings():  # peft warns that the initial adapter it loads changes the base
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(start))
    # peft's conversion keeps the LoRA factors alone; the trained head goes back beside them
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    saved = load_file(path)
    heads = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items() if k not in saved}
    if heads:
        save_file({**saved, **heads}, path, metadata={"format": "pt"})


def _canonical_adapter_config(path: Path) -> None:
    """peft writes target_modules from a set, in an order that changes with Python's hash seed;
    sorted lists and keys make the file byte-identical across runs of one config."""
    import json

    values = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(values.get(key), list):
            values[key] = sorted(values[key])
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def load_trained(cfg, folder: Path, num_labels: int, pad_token_id: int | None, lm_head: bool = False):
    """Rebuild the base model and load the saved global adapter (for evaluation)."""
    base = build_base(cfg, num_labels, pad_token_id, lm_head)
    if cfg.lora_rank > 0:
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = PeftModel.from_pretrained(prepared_for_kbit(base, cfg), str(folder))
        if cfg.torch_dtype != "float32" or cfg.quantization != "none":
            # in the precision the run trained them: float32, the head's copy (made in the base's
            # dtype) cast first and then given the saved values again, unrounded
            float32_trained(model, lambda name, p: "lora_" in name or "modules_to_save" in name)
            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        base_weights.load_into(model, folder)  # FedEx-LoRA / FLoRA runs changed the base weights too
        return_freed_memory()
        return with_lm_parts(model) if lm_head else model
    state = torch.load(folder / FULL_STATE, weights_only=True)
    missing = set(state) - {n for n, _ in base.named_parameters()}
    if missing:
        raise ValueError(f"saved tensors not in the model: {sorted(missing)[:3]}")
    base.load_state_dict(state, strict=False)
    return with_lm_parts(base) if lm_head else base
