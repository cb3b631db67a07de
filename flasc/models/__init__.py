"""Models: the catalog of model families, building a base model with LoRA adapters, the flat
trainable vector clients and server exchange, and saving the trained global model."""

from __future__ import annotations

from flasc.models.build import (
    add_adapters,
    build_base,
    build_model,
    describe,
    freeze_unreached,
    load_tokenizer,
    training_mode,
)
from flasc.models.catalog import MODELS, ModelSpec, ModelUnavailable, is_hub_model, minilm_dir, resolve_name, spec_of
from flasc.models.saving import FULL_STATE, load_trained, save_trained

__all__ = [
    "MODELS",
    "ModelSpec",
    "ModelUnavailable",
    "FULL_STATE",
    "add_adapters",
    "build_base",
    "build_model",
    "describe",
    "freeze_unreached",
    "load_tokenizer",
    "load_trained",
    "minilm_dir",
    "resolve_name",
    "spec_of",
    "is_hub_model",
    "save_trained",
    "training_mode",
]
