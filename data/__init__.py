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


# Tokens per example when max_length is 0. BBC articles state their topic in the first lines;
# 64 tokens keep the embedded default fast on two CPU cores. 128 for 20 Newsgroups as in the seeds.
DEFAULT_MAX_LENGTH = {
    "bbcnews": 64,
    "20newsgroups": 128,
}


def load_task(name: str, data_dir: str, tokenizer, tokenizer_tag: str, max_length: int) -> Task:
    raw = DATASETS[name](data_dir)
    length = max_length or DEFAULT_MAX_LENGTH.get(name, 128)
    return tokenize_cached(name, raw, data_dir, tokenizer, tokenizer_tag, length)


__all__ = ["DATASETS", "DEFAULT_MODEL", "DataUnavailable", "RawTexts", "Split", "Task", "load_task"]
