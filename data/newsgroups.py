"""20 Newsgroups through scikit-learn's downloader, split as in the FLASC seeds.

The training subset's first 80% trains, its last 20% validates; the official test subset tests.
Needs a network the first time (scikit-learn caches the archive under data_dir/20newsgroups).
"""

from __future__ import annotations

from pathlib import Path

from data.base import DataUnavailable, downloads_allowed
from data.text import RawTexts


def load_raw(data_dir: str) -> RawTexts:
    from sklearn.datasets import fetch_20newsgroups

    home = Path(data_dir) / "20newsgroups"
    try:
        train = fetch_20newsgroups(subset="train", data_home=str(home), download_if_missing=downloads_allowed())
        test = fetch_20newsgroups(subset="test", data_home=str(home), download_if_missing=downloads_allowed())
    except Exception as e:  # no network, blocked host, damaged archive...
        raise DataUnavailable(
            f"dataset 20newsgroups could not be downloaded ({type(e).__name__}: {e}); run once with "
            f"network access, or copy scikit-learn's 20news_home folder and its "
            f"20news-bydate_py3.pkz cache into {home}/"
        ) from None
    n_train = int(0.8 * len(train.data))
    labels = [int(y) for y in train.target]
    return RawTexts(
        list(train.target_names),
        {
            "train": (list(train.data[:n_train]), labels[:n_train]),
            "val": (list(train.data[n_train:]), labels[n_train:]),
            "test": (list(test.data), [int(y) for y in test.target]),
        },
    )
