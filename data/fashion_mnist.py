"""Fashion-MNIST (Xiao et al. 2017), the offline image task: 28 x 28 grey images of 10 garments.

Read from the IDX files of, in this order: DATA_DIR/fashion_mnist/, torchvision's
DATA_DIR/FashionMNIST/raw/, or the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist/, `apt-get install dataset-fashion-mnist`); with none of them,
torchvision downloads it into DATA_DIR when there is a network. As for CIFAR-10 in the FLASC
seeds, the training set's first 80% trains and its last 20% validates; the official test set tests.

Images are upscaled to 64 x 64 and the grey channel repeated to RGB for the ImageNet-pretrained
EfficientNet-Lite0, normalised to [-1, 1] as EfficientNet-Lite's own preprocessing does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import DataUnavailable, fetch
from data.images import ImageSplit, augmented, grey_upscaled, read_idx

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIZE = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _files_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def _download(data_dir: Path) -> dict[str, Path]:
    """torchvision's download into DATA_DIR/FashionMNIST/raw/."""
    from torchvision.datasets import FashionMNIST

    def download(tmp: str) -> None:
        FashionMNIST(tmp, train=True, download=True)
        FashionMNIST(tmp, train=False, download=True)

    fetch(
        data_dir,
        download,
        "FashionMNIST",
        f"dataset fashion_mnist: no IDX files in {data_dir / 'fashion_mnist'} or {DEBIAN_DIR}",
        f"install the Debian package (apt-get install dataset-fashion-mnist) or copy the four "
        f"*-ubyte.gz files into {data_dir / 'fashion_mnist'}/",
    )
    return _files_in(data_dir / "FashionMNIST" / "raw")


def find_files(data_dir: str) -> dict[str, Path]:
    root = Path(data_dir)
    for folder in (root / "fashion_mnist", root / "FashionMNIST" / "raw", DEBIAN_DIR):
        files = _files_in(folder)
        if files is not None:
            return files
    return _download(root)


def load_splits(data_dir: str, augment: bool = False) -> tuple[list[str], dict[str, ImageSplit]]:
    """augment: random resized crops to 64 px and horizontal flips in training (off by default)."""
    files = find_files(data_dir)
    try:
        arrays = {k: read_idx(p) for k, p in files.items()}
    except (OSError, ValueError, EOFError) as e:
        raise DataUnavailable(f"dataset fashion_mnist: {e}; replace the damaged file") from None
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataUnavailable(
                f"dataset fashion_mnist: {files[part + '_images']} holds {images.shape} "
                f"images for {labels.shape} labels; expected (N, 28, 28) and (N,)"
            )
    to_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # noqa: E731  (N, 1, 28, 28) uint8
    to_labels = lambda a: torch.from_numpy(a.astype("int64"))  # noqa: E731
    train_x, train_y = to_images(arrays["train_images"]), to_labels(arrays["train_labels"])
    n_train = int(0.8 * len(train_y))
    transform = grey_upscaled(IMAGE_SIZE, MEAN, STD)
    train_tf = augmented(IMAGE_SIZE, MEAN, STD) if augment else transform
    return LABELS, {
        "train": ImageSplit(train_x[:n_train], train_y[:n_train], train_tf),
        "val": ImageSplit(train_x[n_train:], train_y[n_train:], transform),
        "test": ImageSplit(to_images(arrays["test_images"]), to_labels(arrays["test_labels"]), transform),
    }
