"""What every data set produces: a Task with train/val/test splits and the objective it is scored by.

A split is anything with len() and batch(idx) -> dict of tensors (the model's inputs + "labels");
clients are index arrays into `train`, never copies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataUnavailable(RuntimeError):
    """The data set cannot be loaded here; the message says how to provide it."""


@dataclass
class Task:
    name: str
    label_names: list[str]
    train: object
    val: object
    test: object
    objective: object  # objectives.SingleLabel | MultiLabel | NextToken
    users: np.ndarray | None = None  # the natural user (0..U-1) of every training example
    # a category of every training example that partition: dirichlet skews when the task's labels
    # are not classes (instructions: a category column), with its names
    categories: np.ndarray | None = None
    category_names: list[str] | None = None
    dropped: dict[str, int] | None = None  # per split: examples left out because they do not fit

    def skew_labels(self) -> tuple[np.ndarray | None, list[str]]:
        """What partition: dirichlet skews and the partition report counts: the categories where
        the task has them, else its single or multi-hot labels (None: it has neither)."""
        if self.categories is not None:
            return self.categories, list(self.category_names)
        labels = getattr(self.train, "labels", None)
        if labels is None or labels.dim() not in (1, 2) or (labels.dim() == 2 and not self.label_names):
            return None, []
        return labels.numpy(), self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def downloads_allowed() -> bool:
    """FLASC_OFFLINE=1 (nodes without a network, tests): report missing data at once, never download."""
    return os.environ.get("FLASC_OFFLINE", "") in ("", "0")


@contextlib.contextmanager
def network_timeout(seconds: float = 60.0):
    """Bound each socket operation of a download (torchvision's own have none), so that a blocked
    host fails the run with DataUnavailable instead of hanging it."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(root: Path, download: Callable[[str], None], produced: str, unavailable: str, how: str) -> Path:
    """Run download(tmp) in a temporary folder under root and move tmp/produced to root/produced
    only when it completed, so that a failed download leaves nothing behind (root included, when
    this call created it). A failure's DataUnavailable says `unavailable`, why, then `how` to
    provide the data by hand."""
    if not downloads_allowed():
        raise DataUnavailable(f"{unavailable} (FLASC_OFFLINE is set); {how}")
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            with network_timeout():
                download(tmp)
            if not (root / produced).exists():
                shutil.move(str(Path(tmp) / produced), str(root / produced))
    except Exception as e:  # no network, blocked host, interrupted transfer
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise DataUnavailable(f"{unavailable}, and the download failed ({type(e).__name__}); {how}") from None
    return root / produced
