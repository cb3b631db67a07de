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
            pickle.dump(
                {"batch_label": name, "data": data, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}, f
            )
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
            records.append(
                {"user_id": user, "image_id": image_id, "labels": chosen, "partition": part, "fine_grained_labels": []}
            )
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "small_images" / f"{image_id}.jpg")
    (folder / "labels_and_metadata.json").write_text(json.dumps(records))
    return records


def reddit(
    data_dir: Path,
    train_users: dict[str, int],
    eval_users: dict[str, int],
    length: int = 12,
    vocab: int = 50,
    pad: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
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


NEWSGROUPS = ["comp.graphics", "rec.autos", "sci.space"]


def newsgroups(data_dir: Path, n_train: int = 30, n_test: int = 9, seed: int = 0) -> dict:
    """scikit-learn's 20 Newsgroups cache, data_dir/20newsgroups/20news-bydate_py3.pkz: a
    zlib-compressed pickle of {'train': Bunch, 'test': Bunch}, each with data, target,
    filenames and target_names (what load_files gives and fetch_20newsgroups reads back)."""
    import codecs

    from sklearn.utils import Bunch

    rng = np.random.default_rng(seed)
    words = [["pixel", "render", "image"], ["engine", "car", "wheel"], ["orbit", "nasa", "launch"]]
    cache = {}
    for part, n in (("train", n_train), ("test", n_test)):
        target = np.arange(n) % len(NEWSGROUPS)
        texts = [" ".join(rng.choice(words[t], 4)) + " said the poster" for t in target]
        cache[part] = Bunch(
            data=texts,
            target=target,
            target_names=list(NEWSGROUPS),
            DESCR="",
            filenames=np.array([f"{part}/{NEWSGROUPS[t]}/{i}" for i, t in enumerate(target)]),
        )
    folder = data_dir / "20newsgroups"
    folder.mkdir(parents=True)
    (folder / "20news-bydate_py3.pkz").write_bytes(codecs.encode(pickle.dumps(cache), "zlib_codec"))
    return cache
