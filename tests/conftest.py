"""Shared fixtures: a small synthetic text task and tiny random models, so tests need no network."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data.text import RawTexts  # noqa: E402

TOPIC_WORDS = [
    ["stock", "market", "profit", "bank"],
    ["film", "music", "actor", "award"],
    ["election", "minister", "vote", "party"],
]


def toy_raw(data_dir: str, n_per_class: int = 40) -> RawTexts:
    """Three topics, each text a few of its topic's words mixed with shared filler words."""
    rng = np.random.default_rng(0)
    filler = ["the", "a", "today", "news", "said", "new", "year"]

    def make(n):
        texts, labels = [], []
        for label, words in enumerate(TOPIC_WORDS):
            for _ in range(n):
                toks = list(rng.choice(words, 3)) + list(rng.choice(filler, 4))
                rng.shuffle(toks)
                texts.append(" ".join(toks))
                labels.append(label)
        return texts, labels

    return RawTexts(
        ["business", "entertainment", "politics"], {"train": make(n_per_class), "val": make(8), "test": make(10)}
    )


def toy_spec() -> data.DatasetSpec:
    return data.DatasetSpec(
        data.text_classification(toy_raw), "text", "single_label", "tiny-bert", default_max_length=16
    )


@pytest.fixture(autouse=True)
def toy_dataset(monkeypatch):
    """Registers the 'toy' dataset (tiny-bert by default) for every test."""
    monkeypatch.setitem(data.DATASETS, "toy", toy_spec())


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make a run take a second or two."""
    return {
        "dataset": "toy",
        "model": "tiny-bert",
        "data_dir": str(tmp_path / "data"),
        "dir": str(tmp_path / "runs"),
        "name": "run",
        "max_length": 16,
        "clients": 6,
        "server_batch": 3,
        "server_rounds": 3,
        "eval_freq": 2,
        "lora_rank": 4,
        "lora_alpha": 8,
        "client_batch": 8,
        "client_lr": 0.1,
        "gpu": "cpu",
    }


def argv_of(overrides: dict) -> list[str]:
    """train_lora's command line that sets these options."""
    import config

    return [f"--{k.replace('_', '-')}={config.yaml_value(v)}" for k, v in overrides.items()]


def image_overrides(tmp_path: Path, dataset: str, model: str, **extra) -> dict:
    """A one-round run of a tiny image task whose files task_fixtures wrote to tmp_path."""
    return dict(
        dataset=dataset,
        model=model,
        data_dir=str(tmp_path),
        dir=str(tmp_path / "runs"),
        name="run",
        clients=3,
        server_batch=2,
        server_rounds=1,
        lora_rank=2,
        client_batch=4,
        gpu="cpu",
        **extra,
    )


def reloaded_test_metrics(run_dir: Path, batch: int = 64) -> dict:
    """The saved adapter of a finished run, loaded into a fresh base model as its config.yaml
    says, scored on the test split: what the run reported, recomputed independently."""
    import torch

    import config
    from data import load_task_for
    from flasc import models
    from flasc.tasks.evaluation import evaluate

    cfg = config.from_mapping(config.yaml_load((Path(run_dir) / "config.yaml").read_text()))
    tokenizer = lambda: models.load_tokenizer(cfg)  # noqa: E731
    task = load_task_for(cfg, tokenizer)
    tok = tokenizer()[0]
    pad = None if tok is None else tok.pad_token_id
    model = models.load_trained(cfg, Path(run_dir) / "adapter", task.num_labels, pad, task.objective.lm_head)
    return evaluate(model, task.test, task.objective, batch, torch.device("cpu"), False)


# ------------------------------------------------------------------ tiny Hugging Face model folders
SMALL = dict(num_hidden_layers=2, num_attention_heads=2)


def tiny_configs(vocab: int) -> dict:
    import transformers as t

    return {
        "llama": t.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_key_value_heads=1, **SMALL),
        "qwen2": t.Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_key_value_heads=1, **SMALL),
        "roberta": t.RobertaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, **SMALL),
        "distilbert": t.DistilBertConfig(vocab_size=vocab, dim=16, hidden_dim=32, n_layers=2, n_heads=2),
        "gpt2": t.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2),
        "mistral": t.MistralConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_key_value_heads=1, **SMALL
        ),
        "gemma2": t.Gemma2Config(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_key_value_heads=1, head_dim=8, **SMALL
        ),
        "phi3": t.Phi3Config(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_key_value_heads=1, pad_token_id=0, **SMALL
        ),
        "gpt_neox": t.GPTNeoXConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, **SMALL),
        "opt": t.OPTConfig(vocab_size=vocab, hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, **SMALL),
        "deberta-v2": t.DebertaV2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, **SMALL),
    }


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory):
    """architecture -> a folder holding its tiny random model and MiniLM's tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from flasc import models

    tok = AutoTokenizer.from_pretrained(str(models.minilm_dir()))
    out = {}
    for arch, cfg in tiny_configs(len(tok)).items():
        folder = tmp_path_factory.mktemp(arch)
        torch.manual_seed(0)
        AutoModel.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[arch] = folder
    return out
