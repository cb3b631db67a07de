"""Base model per task, LoRA adapters through peft, and the training mode.

One frozen base model stays resident for the whole run; what clients and server exchange are
only its trainable tensors (LoRA factors + classifier head), see flasc/models/params.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flasc.models.catalog import ModelSpec, ModelUnavailable, resolve_name, rewrites_base, spec_of
from flasc.runtime import seeding


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _from_pretrained(loader: Callable, source: str, what: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelUnavailable(
            f"{what} could not be loaded from '{source}' ({type(e).__name__}); with no network, "
            f"download it elsewhere and pass its folder with --model-path"
        ) from None


class MeanPoolClassifier(torch.nn.Module):
    """Encoder, masked mean of the token states, dropout, linear head.

    all-MiniLM-L6-v2 was trained to embed text by mean pooling (its 1_Pooling config), so this
    head starts from a meaningful representation; BERT's [CLS] pooler was never tuned there.
    """

    def __init__(self, encoder, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = torch.nn.Dropout(encoder.config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


class EfficientNetClassifier(torch.nn.Module):
    """efficientnet-lite-pytorch's network with an HF-style interface, BatchNorm kept in eval mode.

    BatchNorm running statistics are buffers, not part of any client update; letting each client's
    batches overwrite them would make the server model depend on the last client trained. So the
    pretrained statistics are used throughout, in training as in evaluation.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values, **_):
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.net(pixel_values))

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class GlobalMeanPool(torch.nn.Module):
    """Global average pooling as a mean over the spatial axes. The same values as
    AdaptiveAvgPool2d(1), whose CUDA backward has no deterministic implementation (deterministic:
    true would refuse to train EfficientNet with it)."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


def _plain_pointwise_convs(net) -> None:
    """Replace each 1 x 1 stride-1 convolution (its 'same' padding is none) by a plain nn.Conv2d
    holding the same weights: peft's LoRA wraps nn.Conv2d but not the package's padded subclass."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, torch.nn.Conv2d)
                and type(child) is not torch.nn.Conv2d
                and child.kernel_size == (1, 1)
                and tuple(child.stride) == (1, 1)
                and child.groups == 1
            ):
                plain = torch.nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)


def _source(cfg) -> str:
    return cfg.model_path or spec_of(cfg).source()


def load_tokenizer(cfg):
    """The tokenizer and a tag that identifies it for the token cache (None, "" for image models)."""
    if spec_of(cfg).inputs != "text":
        return None, ""
    _quiet_transformers()
    from transformers import AutoTokenizer

    source = _source(cfg)
    extra = hub_options(cfg) if spec_of(cfg).family == "auto" else {}
    tok = _from_pretrained(AutoTokenizer.from_pretrained, source, f"tokenizer of {resolve_name(cfg)}", **extra)
    if tok.pad_token is None:  # GPT-2 has none; pad with end-of-text as the seeds do
        tok.pad_token = tok.eos_token
    tag = f"{type(tok).__name__}-{Path(source).name}-{len(tok)}"
    return tok, tag


def _build_efficientnet(cfg, spec: ModelSpec, num_labels: int):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelUnavailable(
            "efficientnet models need the package efficientnet-lite-pytorch: pip install -r requirements.txt"
        ) from None
    extra = {} if spec.pretrained else spec.tiny_config(0, num_labels)
    # The package computes 'same' padding once for a given input size; it is the same for every
    # size divisible by 32 (every stride-2 layer then sees an even size), so any such size works.
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_labels, image_size=64, **extra)
    if spec.pretrained:
        path = _source(cfg)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise ModelUnavailable(
                f"model efficientnet-lite0: weights could not be read from '{path}' "
                f"({type(e).__name__}); pass a state_dict file with --model-path"
            ) from None
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # a new head for our labels
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise ModelUnavailable(
                f"model efficientnet-lite0: '{path}' does not hold EfficientNet-Lite0 "
                f"weights (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
    _plain_pointwise_convs(net)
    net._avg_pooling = GlobalMeanPool()
    return EfficientNetClassifier(net)


def build_base(cfg, num_labels: int, pad_token_id: int | None, lm_head: bool = False):
    """The base model, deterministic for a given seed (random heads included). lm_head: a causal
    language model (next-token objective) instead of a classifier."""
    _quiet_transformers()
    name = resolve_name(cfg)
    spec = spec_of(cfg)
    torch.manual_seed(seeding.derive_seed(cfg.seed, "model_init"))
    if spec.family == "efficientnet":
        model = _build_efficientnet(cfg, spec, num_labels)
    elif spec.family == "auto":
        model = _build_any(cfg, spec, num_labels, pad_token_id, lm_head)  # loaded in torch_dtype
    else:
        model = _built_short(cfg, spec, name, num_labels, pad_token_id, lm_head)
    if cfg.torch_dtype != "float32" and spec.family != "auto":  # built in float32, the frozen base then cast
        model = model.to(dtype_of(cfg.torch_dtype))
    if cfg.torch_dtype != "float32" and spec.inputs == "image":
        # pixels enter in the base's dtype (not every image model casts them itself); read by logits_of
        model.flasc_pixel_dtype = dtype_of(cfg.torch_dtype)
    return checkpointed(model) if cfg.gradient_checkpointing else model


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def auto_for(spec: ModelSpec, lm_head: bool):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    return {
        "bert": AutoModel,
        "vit": AutoModelForImageClassification,
        "gpt2": AutoModelForCausalLM if lm_head else AutoModelForSequenceClassification,
    }[spec.family]


def _built_short(cfg, spec: ModelSpec, name: str, num_labels: int, pad_token_id, lm_head: bool):
    """A model of the catalog's short names: its pretrained weights, or a tiny random config."""
    auto = auto_for(spec, lm_head)
    extra = {} if spec.family == "bert" or lm_head else {"num_labels": num_labels}
    if spec.inputs == "text":
        extra["pad_token_id"] = pad_token_id
    if spec.pretrained:
        model = _from_pretrained(auto.from_pretrained, _source(cfg), f"model {name}", **extra)
    else:
        vocab = len(load_tokenizer(cfg)[0]) if spec.inputs == "text" else 0
        config = spec.tiny_config(vocab, num_labels)
        for key, value in extra.items():
            setattr(config, key, value)
        model = auto.from_config(config)
    if spec.inputs == "text":
        model.config.pad_token_id = pad_token_id
    return MeanPoolClassifier(model, num_labels) if spec.family == "bert" else model


def _build_any(cfg, spec: ModelSpec, num_labels: int, pad_token_id: int | None, lm_head: bool):
    """Any Hugging Face model, by the Auto class the task needs: a causal LM (next token), an image
    classifier (images) or a sequence classifier (text labels), its new head initialised from the
    run's seed."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    extra = {} if lm_head else {"num_labels": num_labels}
    if spec.inputs == "text":
        extra["pad_token_id"] = pad_token_id
    auto = (
        AutoModelForCausalLM
        if lm_head
        else AutoModelForImageClassification
        if spec.inputs == "image"
        else AutoModelForSequenceClassification
    )
    extra.update(hub_options(cfg))
    if cfg.attn_implementation != "auto":
        extra["attn_implementation"] = cfg.attn_implementation
    extra["dtype"] = dtype_of(cfg.torch_dtype)
    if cfg.quantization != "none":
        from flasc.runtime.distributed import launched_ranks, pick_device

        extra["quantization_config"] = quantization_config(cfg, _kept_unquantized(cfg, spec, auto, extra, lm_head))
        # bitsandbytes quantizes where the weights are placed: straight onto this process's device
        extra["device_map"] = {"": str(pick_device(cfg.gpu, launched_ranks()[2]))}
    model = _from_pretrained(auto.from_pretrained, spec.source(), f"model {resolve_name(cfg)}", **extra)
    if spec.inputs == "text":
        model.config.pad_token_id = pad_token_id
    return one_4bit_kernel(model)


def one_4bit_kernel(model):
    """bitsandbytes' 4-bit layers on a CPU with AVX512-BF16 repack their weight, in place, the first
    time they run in eval mode without gradients, and from then on compute with a kernel that has
    no backward: the next round's gradients through the frozen base would be wrong (torch only
    warns) and layers narrower than 32 outputs fail. Off, every 4-bit layer computes as on any
    other CPU, in training and evaluation alike."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return model
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _kept_unquantized(cfg, spec: ModelSpec, auto, extra: dict, lm_head: bool) -> list[str]:
    """The modules that stay in torch_dtype: transformers' own choice (the output embedding, tied
    weights, the last layer) and the whole trained head, which a classifier of several layers
    (RoBERTa's dense + out_proj, DistilBERT's pre_classifier) would otherwise have quantized.
    Found on the model built on the meta device: no weights are read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    keys = ("num_labels", "pad_token_id", "revision", "trust_remote_code")
    config = AutoConfig.from_pretrained(spec.source(), **{k: v for k, v in extra.items() if k in keys})
    with init_empty_weights():
        meta = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return sorted(set(get_keys_to_not_convert(meta)) | set(head_modules(meta, spec, lm_head)))


def quantization_config(cfg, unquantized: list[str]):
    """QLoRA's frozen base (Dettmers et al. 2023): bitsandbytes' 8-bit or 4-bit layers, but for
    the modules named in `unquantized`."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=unquantized)
    compute = cfg.torch_dtype if cfg.bnb_4bit_compute_dtype == "auto" else cfg.bnb_4bit_compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=dtype_of(compute),
        llm_int8_skip_modules=unquantized,
    )


def hub_options(cfg) -> dict:
    """from_pretrained's keywords for a Hugging Face model's revision and remote code."""
    return {"revision": cfg.model_revision, "trust_remote_code": cfg.trust_remote_code}


def checkpointed(model):
    """gradient_checkpointing: the transformers model inside recomputes its activations in the
    backward pass (non-reentrant: the frozen embeddings need no grad for it)."""
    inner = model.encoder if isinstance(model, MeanPoolClassifier) else model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def head_modules(model, spec: ModelSpec, lm_head: bool) -> tuple[str, ...]:
    """The modules that train besides the adapters: the spec's, or for any Hugging Face model the
    top-level modules with parameters beside its base model (a classifier's new head: `score`,
    `classifier`, DistilBERT's `pre_classifier`...). A causal LM trains no head (its output layer
    is often the tied input embedding)."""
    if lm_head:
        return ()
    if spec.family != "auto":
        return spec.head_modules
    base = getattr(model, "base_model_prefix", "")
    return tuple(n for n, m in model.named_children() if n != base and any(True for _ in m.parameters()))


def lora_targets(model, spec: ModelSpec, heads: tuple[str, ...], chosen: list[str] | None = None) -> list[str] | str:
    """Where LoRA goes: the names chosen (lora_target_modules; all-linear: every linear layer; one
    regular expression: the linear layers whose whole names it matches), the
    spec's modules (peft's default for the architecture), or every linear layer (and GPT-2-style
    Conv1D) outside the head. A chosen name the model has no linear layer of is ConfigError."""
    from transformers.pytorch_utils import Conv1D

    linear = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and not any(name == h or name.startswith(h + ".") for h in heads)
    }
    linear -= {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name in heads} | {"lm_head"}
    if chosen is not None and is_expression(chosen):
        return _matched_by(model, chosen[0], heads)
    if chosen is not None and chosen != ["all-linear"]:
        missing = [c for c in chosen if c not in linear]
        if missing:
            from flasc.options import ConfigError

            raise ConfigError(
                f"lora_target_modules: the model has no linear layer named {missing[0]}; expected names among "
                f"{', '.join(sorted(linear))} (or all-linear)"
            )
        return list(chosen)
    if chosen is None and spec.target_modules:
        return list(spec.target_modules)
    return sorted(linear)  # every linear layer outside the head (all-linear, or no default for the model)


def is_expression(chosen: list[str]) -> bool:
    """lora_target_modules as one regular expression (peft matches it against whole module names)
    rather than a list of layer names."""
    return len(chosen) == 1 and any(c in chosen[0] for c in "*+?[](){}|^$\\")


def _matched_by(model, expression: str, heads: tuple[str, ...]) -> str:
    """The expression, once it is known to name linear layers, and none of the head's."""
    import re

    from transformers.pytorch_utils import Conv1D

    from flasc.options import ConfigError

    try:
        pattern = re.compile(expression)
    except re.error as e:
        raise ConfigError(f"lora_target_modules: {expression!r} is not a regular expression ({e})") from None
    matched = [n for n, m in model.named_modules() if pattern.fullmatch(n)]
    output = getattr(model, "get_output_embeddings", lambda: None)()
    heads = (*heads, *(n for n, m in model.named_modules() if output is not None and m is output))
    in_head = [n for n in matched if any(n == h or n.startswith(h + ".") for h in heads)]
    linear = [n for n, m in model.named_modules() if n in matched and isinstance(m, (torch.nn.Linear, Conv1D))]
    if in_head or not linear or len(linear) < len(matched):
        what = (
            f"also matches {in_head[0]}, the head or the output layer"
            if in_head
            else f"matches {next(n for n in matched if n not in linear)}, which is not a linear layer"
            if matched
            else "matches no module of the model"
        )
        raise ConfigError(
            f"lora_target_modules: {expression!r} {what}; expected an expression matching whole names of linear "
            "layers outside the head (such as '.*\\.(q_proj|v_proj)')"
        )
    return expression


def _uses_conv1d(model, targets: list[str] | str) -> bool:
    """GPT-2-style Conv1D layers among the targets: their weights are stored transposed."""
    import re

    from transformers.pytorch_utils import Conv1D

    def targeted(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return name.rsplit(".", 1)[-1] in targets

    return any(isinstance(m, Conv1D) and targeted(name) for name, m in model.named_modules())


def add_adapters(model, cfg, lm_head: bool = False):
    """lora_rank > 0: LoRA (+ head), with peft's variants the config names; 0: head only; -1:
    every parameter trains. Whatever trains is float32, whatever the base's dtype."""
    spec = spec_of(cfg)
    heads = head_modules(model, spec, lm_head)
    model = prepared_for_kbit(model, cfg)
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=(targets := lora_targets(model, spec, heads, cfg.lora_target_modules)),
            bias="none",
            fan_in_fan_out=_uses_conv1d(model, targets),  # GPT-2 stores Conv1D weights transposed
            modules_to_save=list(heads) or None,
            use_dora=cfg.use_dora,
            use_rslora=cfg.use_rslora,
            init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        )
        if cfg.init_lora_weights == "olora" and lora.fan_in_fan_out:
            from flasc.options import ConfigError

            raise ConfigError(
                f"init_lora_weights: peft's olora does not handle the transposed weights of {resolve_name(cfg)}'s "
                "Conv1D layers; expected init_lora_weights: default, gaussian, orthogonal or pissa"
            )
        torch.manual_seed(seeding.derive_seed(cfg.seed, "model_init", 1))  # LoRA A init
        model = get_peft_model(model, lora)
        if rewrites_base(cfg):  # kept to save the adapter for the original base (saving.save_trained)
            model.flasc_initial_adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        if cfg.freeze_a:
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
    elif cfg.lora_rank == 0:
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(h + ".") or f".{h}." in n for h in heads))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return float32_trained(model, lambda name, p: p.requires_grad)


def prepared_for_kbit(model, cfg):
    """A quantized base through peft's k-bit preparation (the unquantized tensors, embeddings and
    norms, in float32); the activations are checkpointed by build_base when asked for."""
    if cfg.quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def float32_trained(model, trained: Callable[[str, torch.Tensor], bool]):
    """The trained tensors (`trained(name, parameter)`) in float32 over a base of lower precision.
    A module that holds one (a head) is cast whole, buffers too, and gets its floating inputs cast
    to float32; peft's LoRA layers cast their own inputs."""
    from peft.tuners.lora import LoraLayer

    lora_parts = {id(m) for layer in model.modules() if isinstance(layer, LoraLayer) for m in layer.modules()}
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    cast = {
        id(owner[id(p)]): owner[id(p)]
        for n, p in model.named_parameters()
        if trained(n, p) and p.dtype != torch.float32
    }
    for module in cast.values():
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.float()
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(module, name, b.float())
        if id(module) not in lora_parts:
            module.register_forward_pre_hook(_inputs_as_float32, with_kwargs=True)
    return model


def _inputs_as_float32(module, args, kwargs):
    def as32(a):
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    return tuple(as32(a) for a in args), {k: as32(v) for k, v in kwargs.items()}


def build_model(cfg, num_labels: int, pad_token_id: int | None, lm_head: bool = False):
    model = add_adapters(build_base(cfg, num_labels, pad_token_id, lm_head), cfg, lm_head)
    return_freed_memory()
    return with_lm_parts(model) if lm_head else model


@dataclass(frozen=True)
class LMParts:
    body: torch.nn.Module  # input ids -> last hidden states (the decoder without its output layer)
    head: torch.nn.Module  # the output layer: hidden states -> logits


def with_lm_parts(model):
    """Mark a causal LM whose logits are its output layer applied to its decoder's last hidden
    state (model.flasc_lm, read by tasks.evaluation.logits_of): then the loss applies the output
    layer a chunk of positions at a time. Checked once on a probe: a model that changes its logits
    after the output layer (Gemma 2's soft-capping, a logit scale) keeps its own logits: its
    logits must be the output layer's own outputs, and the layer's inputs the decoder's outputs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(base, getattr(base, "base_model_prefix", ""), None), base.get_output_embeddings()
    if body is None or not isinstance(head, torch.nn.Linear):
        return model
    device = head.weight.device
    probe = torch.arange(1, 5, device=device).clamp(max=head.weight.shape[0] - 1).unsqueeze(0)
    seen = {}
    hook = head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=probe).logits
            states = body(input_ids=probe)[0]
    finally:
        hook.remove()
        model.train(was_training)
    # exact: a soft-cap or a scale changes the last bits of small logits too
    if torch.equal(logits, seen["y"]) and torch.equal(states.to(seen["x"].dtype), seen["x"]):
        model.flasc_lm = LMParts(body, head)
    return model


def return_freed_memory() -> None:
    """Hand the heap freed while loading back to the system. Loading casts and quantizes tensor by
    tensor; glibc keeps the freed pages, so without this a 4-bit Qwen2-0.5B-shaped process would go
    on holding 0.9 GB it no longer uses (bench/llm_memory.py). Elsewhere than glibc: nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def training_mode(model, base_dropout: bool = True):
    """Put the model in local-training mode. base_dropout false reproduces the FLASC code, whose
    model is never put in train mode: the base model's dropout (and any other train-time behaviour
    of the base) stays off and only the LoRA dropout, which peft creates in train mode, is active."""
    model.train(base_dropout)
    if not base_dropout:
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_dropout.train()
    return model


def freeze_unreached(model, batch: dict, device: torch.device) -> list[str]:
    """Freeze the trainable parameters that a backward pass from the outputs does not reach (with
    full fine-tuning: BERT's pooler under the mean-pool head). They could never change, their grad
    would stay None, and exchanging them would only cost bytes. Returns their names.

    The probe runs in eval mode under a forked generator, so it draws nothing from the run's
    random streams."""
    from flasc.tasks.evaluation import full_logits, logits_of

    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        full_logits(logits_of(model, batch, device, bf16=False)).sum().backward()
    unreached = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            unreached.append(name)
            p.requires_grad_(False)
        p.grad = None
    model.train(was_training)
    return unreached


def describe(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(real_numel(p) for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def real_numel(p: torch.Tensor) -> int:
    """The values a tensor stands for: a bitsandbytes 4-bit weight packs two in each byte it stores."""
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()
