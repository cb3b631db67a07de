"""Synthetic tasks and random-weight models for checks that must run with no data, no weights and
no network (bench/gpu_check.py): a bare GPU machine has PyTorch, transformers, tokenizers and peft,
but neither the embedded MiniLM/BBC News packages nor a hub.

Everything is registered in the ordinary registries (data.DATASETS, models.MODELS), so a run goes
through exactly the code path of a real one: build, partition, local training, merging, evaluation.

- Text: a word-level tokenizer over the words w0 .. w{V-1} (saved to a folder and passed as
  --model-path), texts of random words whose label shifts the word distribution, so the task is
  learnable. Vocabularies of 30522 (BERT/MiniLM) and 50257 (GPT-2) give the real embedding sizes.
- Images: uint8 images whose brightness depends on the label, 224 px (ViT) or 64 px (EfficientNet).
- Multi-label images and next-token text have natural users (like FLAIR and Reddit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from data.base import Task  # noqa: E402
from data.images import ImageSplit  # noqa: E402
from data.text import RawTexts, Split  # noqa: E402
from flasc import models  # noqa: E402
from flasc.tasks import objectives  # noqa: E402

USERS = 6  # natural users of the multi-label and next-token tasks
LABELS = 5


def write_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A word-level fast tokenizer with [PAD]=0, [UNK]=1 and words w0.. up to vocab_size entries,
    saved with save_pretrained so that AutoTokenizer.from_pretrained(folder) loads it offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return folder


def _texts(rng, n: int, words: int, vocab: int, labels: int) -> tuple[list[str], list[int]]:
    """Texts of `words` random words; each label favours its own band of the vocabulary."""
    y = rng.integers(0, labels, n)
    band = max((vocab - 2) // labels, 1)
    texts = []
    for label in y:
        favoured = rng.integers(label * band, (label + 1) * band, words // 2)
        anywhere = rng.integers(0, vocab - 2, words - words // 2)
        toks = np.concatenate([favoured, anywhere])
        rng.shuffle(toks)
        texts.append(" ".join(f"w{t}" for t in toks))
    return texts, [int(v) for v in y]


def text_raw(train: int, vocab: int, words: int, seed: int = 0):
    def load_raw(data_dir: str) -> RawTexts:
        rng = np.random.default_rng(seed)
        return RawTexts(
            [f"label{i}" for i in range(LABELS)],
            {
                "train": _texts(rng, train, words, vocab, LABELS),
                "val": _texts(rng, 16, words, vocab, LABELS),
                "test": _texts(rng, 16, words, vocab, LABELS),
            },
        )

    return load_raw


def _normalised(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images).float() / 127.5 - 1.0


def _images(rng, n: int, size: int, labels: np.ndarray) -> torch.Tensor:
    base = (labels.reshape(-1, *([1] * 3)) if labels.ndim == 1 else labels.sum(1).reshape(-1, 1, 1, 1)) * 40
    noise = rng.integers(0, 60, (n, 3, size, size))
    return torch.from_numpy(np.clip(base + noise, 0, 255).astype(np.uint8))


def image_task(train: int, size: int, seed: int = 0):
    def load(ctx) -> Task:
        rng = np.random.default_rng(seed)
        splits = {}
        for part, n in (("train", train), ("val", 16), ("test", 16)):
            y = rng.integers(0, LABELS, n)
            splits[part] = ImageSplit(_images(rng, n, size, y), torch.from_numpy(y), _normalised)
        return Task(ctx.name, [f"label{i}" for i in range(LABELS)], **splits, objective=objectives.SingleLabel(LABELS))

    return load


def multilabel_task(per_user: int, size: int = 224, seed: int = 0):
    def load(ctx) -> Task:
        rng = np.random.default_rng(seed)
        splits = {}
        for part, n in (("train", USERS * per_user), ("val", 8), ("test", 8)):
            y = (rng.random((n, LABELS)) < 0.4).astype(np.int64)
            splits[part] = ImageSplit(_images(rng, n, size, y), torch.from_numpy(y), _normalised)
        users = np.repeat(np.arange(USERS), per_user)
        return Task(
            ctx.name,
            [f"label{i}" for i in range(LABELS)],
            **splits,
            objective=objectives.MultiLabel(LABELS),
            users=users,
        )

    return load


def lm_task(per_user: int, length: int, seed: int = 0):
    """Next-token sequences over the tokenizer's words (ids 2..), right-padded with 0."""

    def load(ctx) -> Task:
        tokenizer, _ = ctx.tokenizer()
        vocab = len(tokenizer)
        g = torch.Generator().manual_seed(seed)

        def split(n):
            x = torch.randint(2, vocab, (n, length), generator=g)
            x[:, 1::2] = (x[:, ::2] + 1) % vocab  # every second token follows from the one before
            lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
            mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
            return Split(x * mask, mask)

        return Task(
            ctx.name,
            [],
            split(USERS * per_user),
            split(8),
            split(8),
            objective=objectives.NextToken(),
            users=np.repeat(np.arange(USERS), per_user),
        )

    return load


def register_tasks(examples_per_client: int = 10, text_words: int = 14) -> dict[str, str]:
    """The synthetic data sets, named after the real ones they stand in for. Returns real -> synthetic."""
    data.DATASETS["synthetic_text"] = data.DatasetSpec(
        data.text_classification(text_raw(6 * examples_per_client, 1000, text_words)),
        "text",
        "single_label",
        "tiny-bert",
        default_max_length=16,
    )
    data.DATASETS["synthetic_image"] = data.DatasetSpec(
        image_task(6 * examples_per_client, 224), "image", "single_label", "tiny-vit"
    )
    data.DATASETS["synthetic_image64"] = data.DatasetSpec(
        image_task(6 * examples_per_client, 64), "image", "single_label", "tiny-efficientnet"
    )
    data.DATASETS["synthetic_multilabel"] = data.DatasetSpec(
        multilabel_task(examples_per_client), "image", "multi_label", "tiny-vit", natural_users=True
    )
    data.DATASETS["synthetic_lm"] = data.DatasetSpec(
        lm_task(examples_per_client, 16), "text", "next_token", "tiny-gpt2", natural_users=True
    )
    return {
        "bbcnews": "synthetic_text",
        "20newsgroups": "synthetic_text",
        "cifar10": "synthetic_image",
        "fashion_mnist": "synthetic_image64",
        "flair": "synthetic_multilabel",
        "reddit": "synthetic_lm",
    }


# ---------------------------------------------------------------- size-realistic random models
def _minilm_shape(vocab: int, num_labels: int):
    from transformers import BertConfig  # all-MiniLM-L6-v2's config

    return BertConfig(
        vocab_size=vocab,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=num_labels,
    )


def _gpt2_shape(vocab: int, num_labels: int):
    from transformers import GPT2Config  # GPT-2 small (124M)

    return GPT2Config(vocab_size=vocab, n_embd=768, n_layer=12, n_head=12, n_positions=1024, num_labels=num_labels)


def _vit_shape(vocab: int, num_labels: int):
    from transformers import ViTConfig  # ViT-B/16 at 224 px

    return ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        num_labels=num_labels,
    )


SHAPES = {  # name: (model spec base, config, vocabulary, real model it stands for)
    "minilm-shape": (models.MODELS["tiny-bert"], _minilm_shape, 30522, "MiniLM-L6 (22.7M)"),
    "gpt2-shape": (models.MODELS["tiny-gpt2"], _gpt2_shape, 50257, "GPT-2 small (124M)"),
    "vit-shape": (models.MODELS["tiny-vit"], _vit_shape, 0, "ViT-B/16 (86M)"),
}


def register_shapes(tokenizer_dir: Path) -> None:
    """Random-weight models of the real architectures' sizes, as models.MODELS entries; text ones
    read a synthetic tokenizer of the real vocabulary size from tokenizer_dir/<vocab>."""
    from dataclasses import replace

    for name, (base, shape, vocab, _) in SHAPES.items():
        source = str(write_tokenizer(tokenizer_dir / str(vocab), vocab)) if vocab else ""
        models.MODELS[name] = replace(base, source=lambda s=source: s, tiny_config=shape)


def register_timing_tasks(examples_per_client: int, clients: int, length: int) -> None:
    """Single-label text (vocabularies of both shapes) and 224 px images, clients x examples each."""
    n = examples_per_client * clients
    for vocab in (30522, 50257):
        data.DATASETS[f"synthetic_text{vocab}"] = data.DatasetSpec(
            data.text_classification(text_raw(n, vocab, length)),
            "text",
            "single_label",
            "tiny-bert",
            default_max_length=length,
        )
    data.DATASETS["synthetic_image_timing"] = data.DatasetSpec(image_task(n, 224), "image", "single_label", "tiny-vit")
