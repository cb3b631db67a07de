"""CIFAR-10 as in the FLASC seeds: torchvision's python pickle batches, the training set's first
80% trains and its last 20% validates, the official test batch tests; random resized crops to 224
and horizontal flips for training (augment: true, this data set's default in
configs/datasets/cifar10.yaml; false trains on the evaluation transform), resize to 224 for
evaluation, CIFAR mean/std.

Read from DATA_DIR/cifar10/cifar-10-batches-py/ (where the seeds' torchvision root put it) or
DATA_DIR/cifar-10-batches-py/; with neither, torchvision downloads it when there is a network.
The seeds validated with the training transform; here validation uses the evaluation transform,
so that validation scores do not depend on random crops.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from data.base import DataUnavailable, fetch
from data.images import CIFAR_MEAN, CIFAR_STD, ImageSplit, augmented, resized

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SIZE = 224


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:  # unreadable, cut short, damaged
        raise DataUnavailable(
            f"dataset cifar10: {path} is not a CIFAR-10 batch file ({type(e).__name__}); delete "
            f"{path.parent} to download it again"
        ) from None
    if not isinstance(blob, dict):
        raise DataUnavailable(f"dataset cifar10: {path} is not a CIFAR-10 batch file; delete {path.parent}")
    return blob


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*TRAIN_BATCHES, "test_batch", "batches.meta"))


def _download(root: Path) -> Path:
    from torchvision.datasets import CIFAR10

    return fetch(
        root,
        lambda tmp: CIFAR10(tmp, train=True, download=True),
        FOLDER,
        f"dataset cifar10: no copy in {root / FOLDER}",
        f"download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root}/",
    )


def find_folder(data_dir: str) -> Path:
    for folder in (Path(data_dir) / "cifar10" / FOLDER, Path(data_dir) / FOLDER):
        if _complete(folder):
            return folder
    return _download(Path(data_dir) / "cifar10")


def _read(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    blobs = [_unpickle(folder / n) for n in names]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in blobs])
    labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in blobs])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataUnavailable(
            f"dataset cifar10: {folder} holds data of shape {data.shape}; expected (N, 3072) rows of 32 x 32 RGB images"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_splits(data_dir: str, augment: bool = False) -> tuple[list[str], dict[str, ImageSplit]]:
    folder = find_folder(data_dir)
    try:
        label_names = list(_unpickle(folder / "batches.meta")["label_names"])
        train_x, train_y = _read(folder, TRAIN_BATCHES)
        test_x, test_y = _read(folder, ["test_batch"])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError) as e:
        raise DataUnavailable(
            f"dataset cifar10: {folder} is damaged ({type(e).__name__}: {e}); extract cifar-10-python.tar.gz again"
        ) from None
    n_train = int(0.8 * len(train_y))
    eval_tf = resized(IMAGE_SIZE, CIFAR_MEAN, CIFAR_STD)
    train_tf = augmented(IMAGE_SIZE, CIFAR_MEAN, CIFAR_STD) if augment else eval_tf
    return label_names, {
        "train": ImageSplit(train_x[:n_train], train_y[:n_train], train_tf),
        "val": ImageSplit(train_x[n_train:], train_y[n_train:], eval_tf),
        "test": ImageSplit(test_x, test_y, eval_tf),
    }
