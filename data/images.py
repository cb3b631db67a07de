"""Image splits: uint8 images (in memory, or JPEG files read when a batch needs them) turned into
normalised float batches by the split's transform.

Random augmentations draw from torch's global generator, which the training loop seeds per
(seed, round, client), so augmented runs reproduce exactly.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# A transform maps a list of uint8 (C, H, W) images to one float (B, 3, S, S) batch.
Transform = Callable[[list[torch.Tensor]], torch.Tensor]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # as in the FLASC seeds
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageSplit:
    """images: a uint8 tensor (N, C, H, W), or image file paths decoded on demand.
    labels: (N,) class indices, or (N, K) 0/1 multi-hot rows."""

    def __init__(self, images: torch.Tensor | Sequence[str], labels: torch.Tensor, transform: Transform):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, i: int) -> torch.Tensor:
        if isinstance(self.images, torch.Tensor):
            return self.images[i]
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(str(self.images[i]), mode=ImageReadMode.RGB)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx)
        if isinstance(self.images, torch.Tensor):
            images = list(self.images[idx])
        else:
            images = [self._image(int(i)) for i in idx]
        return {"pixel_values": self.transform(images), "labels": self.labels[idx]}


# ---------------------------------------------------------------- transforms
def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def grey_upscaled(size: int, mean, std) -> Transform:
    """Grey images (1, h, w) -> bilinear upscale to size x size, the channel repeated to RGB."""

    def transform(images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images).float() / 255
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return _normalize(x.expand(-1, 3, -1, -1), mean, std)

    return transform


def augmented(size: int, mean, std, vertical_flip: bool = False) -> Transform:
    """The seeds' training transform: random resized crop to size, horizontal (and vertical) flips."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if vertical_flip:
        steps.append(v2.RandomVerticalFlip())
    per_image = v2.Compose(steps)

    def transform(images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack([per_image(im) for im in images]).float() / 255
        return _normalize(x.expand(-1, 3, -1, -1), mean, std)  # grey images: the channel repeated to RGB

    return transform


def resized(size: int, mean, std) -> Transform:
    """The seeds' evaluation transform: resize the shorter side to size (centre crop if not square)."""
    from torchvision.transforms import v2

    per_image = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def transform(images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack([per_image(im) for im in images]).float() / 255
        return _normalize(x, mean, std)

    return transform


# ---------------------------------------------------------------- IDX files (MNIST format)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): magic 0, 0, type code, number of dimensions; big-endian
    uint32 sizes; then the values row-major."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)
