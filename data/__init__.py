"""Task registry: each dataset module turns raw texts into one tokenized Task.

A Task holds tensors for train/val/test; clients are index arrays into `train`, never copies.
"""
from __future__ import annotations

from typing import Callable

from data import bbcnews, newsgroups
from data.text import DataUnavailable, RawTexts, Split, Task, tokenize_cached

# name -> function(data_dir) returning RawTexts
DATASETS: dict[str, Callable[[str], RawTexts]] = {
    "bbcnews": bbcnews.load_raw,
    "20newsgroups": newsgroups.load_raw,
}

# The model each dataset trains by default (models.MODELS key).
DEFAULT_MODEL = {
    "bbcnews": "minilm",
    "20newsgroups": "gpt2",
}


def load_task(name: str, data_dir: str, tokenizer, tokenizer_tag: str, max_length: int) -> Task:
    raw = DATASETS[name](data_dir)
    return tokenize_cached(name, raw, data_dir, tokenizer, tokenizer_tag, max_length)


__all__ = ["DATASETS", "DEFAULT_MODEL", "DataUnavailable", "RawTexts", "Split", "Task", "load_task"]
