"""Text tasks: raw texts -> padded token tensors, cached on disk once per tokenizer and length."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from data.base import DataUnavailable
from flasc.runtime import files


@dataclass
class RawTexts:
    label_names: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # 'train' | 'val' | 'test' -> (texts, labels)


@dataclass
class Split:
    input_ids: torch.Tensor  # (N, L) int64, right-padded
    attention_mask: torch.Tensor  # (N, L) int64
    labels: torch.Tensor | None = None  # (N,) int64; None for language modelling

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at idx, padding trimmed to the longest of them (saves compute)."""
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)
        out = {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out


def _fingerprint(raw: RawTexts, tokenizer_tag: str, max_length: int) -> str:
    h = hashlib.sha1(f"{tokenizer_tag}|{max_length}|{raw.label_names}".encode())
    for split in ("train", "val", "test"):
        texts, labels = raw.splits[split]
        h.update(split.encode())
        for text, label in zip(texts, labels):
            h.update(text.encode("utf-8", "replace"))
            h.update(label.to_bytes(4, "little"))
    return h.hexdigest()[:16]


def _tokenize(texts: list[str], labels: list[int], tokenizer, max_length: int) -> Split:
    enc = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return Split(enc["input_ids"].long(), enc["attention_mask"].long(), torch.tensor(labels, dtype=torch.long))


def tokenize_cached(
    name: str, raw: RawTexts, data_dir: str, tokenizer, tokenizer_tag: str, max_length: int
) -> dict[str, Split]:
    key = _fingerprint(raw, tokenizer_tag, max_length)
    path = Path(data_dir) / name / f"tokens-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            return {s: Split(**blob[s]) for s in ("train", "val", "test")}
        except Exception:  # a damaged cache is rebuilt, never trusted
            with contextlib.suppress(OSError):  # (a read-only one is left, and said so below)
                path.unlink()
    splits = {s: _tokenize(*raw.splits[s], tokenizer, max_length) for s in ("train", "val", "test")}
    save_cache(path, {s: vars(v) for s, v in splits.items()}, data_dir, name, max_length)
    return splits


def save_cache(path: Path, blob: dict, data_dir: str, name: str, max_length: int) -> None:
    """A data set's tokens written atomically (a crash or a full disk never leaves a half-written
    cache); a read-only data_dir is said as bad input."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, buf.getvalue())
    except (OSError, files.WriteFailed) as e:
        if e.errno in READ_ONLY:
            raise DataUnavailable(
                f"data_dir {data_dir} is read-only ({files.reason_of(e)}) and holds no cache for {name} "
                f"tokenized to max_length {max_length} ({path.name}); point data_dir at a writable folder"
            ) from None
        raise e if isinstance(e, files.WriteFailed) else files.failed(e, path) from None


READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
