"""Small data sets written in the exact on-disk formats the loaders read (tests only)."""
from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import torch


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: two zero bytes, type code 0x08 (unsigned byte), the number of dimensions, the sizes as
    big-endian uint32, then the bytes; gzipped as distributed."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fashion_mnist(data_dir: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    """Grey 28 x 28 images whose brightness encodes the label (learnable by a tiny model)."""
    rng = np.random.default_rng(seed)
    folder = data_dir / "fashion_mnist"
    folder.mkdir(parents=True)
    out = {}
    for part, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.clip(labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28)), 0, 255).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[part] = (images, labels)
    return out


def cifar10(data_dir: Path, per_batch: int = 10, n_test: int = 10, seed: int = 0) -> dict:
    """cifar-10-batches-py/: five training batches, a test batch and batches.meta, each a pickled
    dict ('data': uint8 (N, 3072) rows of R, G, B planes; 'labels': list of int)."""
    rng = np.random.default_rng(seed)
    folder = data_dir / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    out = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
        out[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return out


FLAIR_LABELS = ["animal", "equipment", "food", "plant"]


def flair(data_dir: Path, users: dict[str, str] | None = None, per_user: int = 3, seed: int = 0) -> list[dict]:
    """labels_and_metadata.json + small_images/<image_id>.jpg; users maps user id -> partition."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    users = users or {"u1": "train", "u2": "train", "u3": "train", "v1": "val", "t1": "test"}
    folder = data_dir / "flair"
    (folder / "small_images").mkdir(parents=True)
    records = []
    for user, part in users.items():
        for k in range(per_user):
            image_id = f"{user}_{k:03d}"
            chosen = [name for name in FLAIR_LABELS if rng.random() < 0.4] or [FLAIR_LABELS[k % 4]]
            records.append({"user_id": user, "image_id": image_id, "labels": chosen, "partition": part,
                            "fine_grained_labels": []})
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "small_images" / f"{image_id}.jpg")
    (folder / "labels_and_metadata.json").write_text(json.dumps(records))
    return records


def reddit(data_dir: Path, train_users: dict[str, int], eval_users: dict[str, int], length: int = 12,
           vocab: int = 50, pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """train_clients.json / eval_clients.json (user -> count, as the seeds' files map names to
    data) and cache/<user>.pt = {'X': LongTensor (sequences, length)}, right-padded with `pad`."""
    g = torch.Generator().manual_seed(seed)
    folder = data_dir / "reddit"
    (folder / "cache").mkdir(parents=True)
    tensors = {}
    for user, n in {**train_users, **eval_users}.items():
        x = torch.randint(1, vocab, (n, length), generator=g)
        lengths = torch.randint(3, length + 1, (n,), generator=g)
        x[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = pad
        torch.save({"X": x}, folder / "cache" / f"{user}.pt")
        tensors[user] = x
    (folder / "train_clients.json").write_text(json.dumps(train_users))
    (folder / "eval_clients.json").write_text(json.dumps(eval_users))
    return tensors
