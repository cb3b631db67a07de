"""FLAIR (Song et al. 2022): Flickr photos of many users, 17 coarse labels, any subset per image.

The layout of Apple's ml-flair download: labels_and_metadata.json (a list of records with user_id,
image_id, labels, partition in train/val/test) and small_images/<image_id>.jpg, read from
DATA_DIR/flair/ or DATA_DIR/ml-flair/data/. As in the FLASC seeds every training user is one
natural client and the val/test users are pooled. Training images are resized to 224 like the
evaluation ones, as the seeds' active loader does (their augmenting loader, random resized crops to
224 with horizontal and vertical flips, was unused; augment: true selects it). ImageNet mean/std
(the seeds divided by the squared std, a slip not copied here). Label order is alphabetical, so it
is the same in every process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.base import DataUnavailable
from data.images import IMAGENET_MEAN, IMAGENET_STD, ImageSplit, augmented, resized

METADATA = "labels_and_metadata.json"
IMAGE_SIZE = 224
PARTITIONS = ("train", "val", "test")


def find_folder(data_dir: str) -> Path:
    candidates = [Path(data_dir) / "flair", Path(data_dir) / "ml-flair" / "data"]
    for folder in candidates:
        if (folder / METADATA).is_file():
            return folder
    raise DataUnavailable(
        f"dataset flair: no {METADATA} in {candidates[0]} or {candidates[1]}; download FLAIR with "
        f"the download_dataset.py script of github.com/apple/ml-flair (small images) and put "
        f"{METADATA} and small_images/ into {candidates[0]}/"
    )


def _records(folder: Path) -> list[dict]:
    try:
        records = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise DataUnavailable(f"dataset flair: {folder / METADATA} is not readable JSON ({e})") from None
    if not isinstance(records, list):
        raise DataUnavailable(f"dataset flair: {folder / METADATA} must hold a list of records")
    for i, r in enumerate(records):
        missing = {"user_id", "image_id", "labels", "partition"} - set(r) if isinstance(r, dict) else {"a mapping"}
        if missing:
            raise DataUnavailable(f"dataset flair: record {i} of {METADATA} lacks {', '.join(sorted(missing))}")
        if r["partition"] not in PARTITIONS:
            raise DataUnavailable(
                f"dataset flair: record {i} has partition {r['partition']!r}; expected one of {', '.join(PARTITIONS)}"
            )
    return records


def load_splits(data_dir: str, augment: bool = False) -> tuple[list[str], dict[str, ImageSplit], np.ndarray]:
    """Label names, the splits, and the user index of every training example."""
    folder = find_folder(data_dir)
    records = _records(folder)
    label_names = sorted({label for r in records for label in r["labels"]})
    column = {name: j for j, name in enumerate(label_names)}
    images = folder / "small_images"
    absent = [r["image_id"] for r in records if not (images / f"{r['image_id']}.jpg").is_file()]
    if absent:
        raise DataUnavailable(
            f"dataset flair: {len(absent)} images named in {METADATA} are missing from "
            f"{images}/ (first: {absent[0]}.jpg)"
        )
    eval_tf = resized(IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    train_tf = augmented(IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, vertical_flip=True) if augment else eval_tf
    splits = {}
    for part in PARTITIONS:
        rows = [r for r in records if r["partition"] == part]
        labels = torch.zeros(len(rows), len(label_names), dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, [column[name] for name in r["labels"]]] = 1
        paths = [str(images / f"{r['image_id']}.jpg") for r in rows]
        splits[part] = ImageSplit(paths, labels, train_tf if part == "train" else eval_tf)
    user_index: dict[str, int] = {}
    users = np.array(
        [user_index.setdefault(str(r["user_id"]), len(user_index)) for r in records if r["partition"] == "train"],
        dtype=np.int64,
    )
    return label_names, splits, users
