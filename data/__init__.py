"""Data set registry: each entry loads one Task (splits + objective + natural users, if any).

A DatasetSpec says what the data set feeds the model (text or images), which objective scores it
(objectives.py), which model it trains by default, and whether its examples belong to natural
users (then partition: natural makes each user one client).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from data import bbcnews, cifar10, fashion_mnist, flair, newsgroups, reddit
from data.base import DataUnavailable, Task
from data.text import RawTexts, Split, tokenize_cached
from flasc.options import ConfigError
from flasc.tasks import objectives


@dataclass(frozen=True)
class LoadContext:
    name: str
    data_dir: str
    # () -> (tokenizer, tag identifying it): called only once the data are found, so that a run
    # without its data says so rather than failing first on the tokenizer's download
    tokenizer: Callable[[], tuple[object, str]] | None = None
    max_length: int = 0  # 0: the data set's default
    augment: bool = False  # images: random crops and flips in training (config's augment)


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[LoadContext], Task]
    inputs: str  # "text" | "image"
    objective: str  # "single_label" | "multi_label" | "next_token" (objectives.py)
    default_model: str  # models.MODELS key
    natural_users: bool = False  # examples belong to users (partition: natural)
    default_max_length: int = 0  # tokens per example when max_length is 0 (text)

    # the options a data set reads (model fitting and tokenizing: flasc/models/catalog.py)
    options = (
        "dataset",
        "data_dir",
        "max_length",
        "clients",
        "partition",
        "iid_alpha",
        "min_client_size",
        "iid_mix",
        "augment",
    )

    def partition_of(self, cfg) -> str:
        """auto: each natural user one client where the data set has users, else a Dirichlet label skew."""
        if cfg.partition != "auto":
            return cfg.partition
        return "natural" if self.natural_users else "dirichlet"

    def check(self, cfg) -> None:
        """The options that depend on what the data set is (ConfigError names the first that does not fit)."""
        partition, name = self.partition_of(cfg), cfg.dataset
        if partition == "natural" and not self.natural_users:
            raise ConfigError(
                f"partition: natural makes each user a client, but dataset {name} has no "
                "users; expected auto, dirichlet or iid"
            )
        if partition == "dirichlet" and self.objective != "single_label":
            raise ConfigError(
                f"partition: dirichlet skews single labels, but dataset {name} is "
                f"{self.objective.replace('_', '-')}; expected auto, natural or iid"
            )
        if cfg.clients == 0 and partition != "natural":
            raise ConfigError(
                f"clients: 0 means every user of a natural partition; partition {partition} "
                "needs a number of clients >= 1"
            )
        if cfg.augment and self.inputs != "image":
            raise ConfigError(
                f"augment: dataset {name} has text; random crops and flips apply to images; expected false"
            )
        if cfg.max_length and self.inputs != "text":
            raise ConfigError(f"max_length: dataset {name} has images, not tokens; expected 0")
        if self.objective == "next_token" and cfg.lora_rank == 0:
            raise ConfigError(
                f"lora_rank: 0 trains only a classifier head, and dataset {name} is language "
                "modelling without one; expected lora_rank >= 1 or -1"
            )


def text_classification(load_raw: Callable[[str], RawTexts]) -> Callable[[LoadContext], Task]:
    """Raw texts -> token tensors (cached per tokenizer and length) -> a single-label Task."""

    def load(ctx: LoadContext) -> Task:
        raw = load_raw(ctx.data_dir)
        length = ctx.max_length or DATASETS[ctx.name].default_max_length
        tokenizer, tag = ctx.tokenizer()
        splits = tokenize_cached(ctx.name, raw, ctx.data_dir, tokenizer, tag, length)
        return Task(ctx.name, raw.label_names, **splits, objective=objectives.SingleLabel(len(raw.label_names)))

    return load


def image_classification(load_splits: Callable[[str, bool], tuple[list[str], dict]]) -> Callable[[LoadContext], Task]:
    """(label names, splits) of an image data set -> a single-label Task."""

    def load(ctx: LoadContext) -> Task:
        labels, splits = load_splits(ctx.data_dir, ctx.augment)
        return Task(ctx.name, labels, **splits, objective=objectives.SingleLabel(len(labels)))

    return load


def _flair(ctx: LoadContext) -> Task:
    labels, splits, users = flair.load_splits(ctx.data_dir, ctx.augment)
    return Task(ctx.name, labels, **splits, objective=objectives.MultiLabel(len(labels)), users=users)


def _reddit(ctx: LoadContext) -> Task:
    splits, users = reddit.load_splits(ctx.data_dir, ctx.tokenizer, ctx.max_length)
    return Task(ctx.name, [], **splits, objective=objectives.NextToken(), users=users)


DATASETS: dict[str, DatasetSpec] = {
    # BBC articles state their topic in the first lines; 64 tokens keep the embedded default fast
    # on two CPU cores. 128 for 20 Newsgroups as in the seeds.
    "bbcnews": DatasetSpec(
        text_classification(bbcnews.load_raw), "text", "single_label", "minilm", default_max_length=64
    ),
    "20newsgroups": DatasetSpec(
        text_classification(newsgroups.load_raw), "text", "single_label", "gpt2", default_max_length=128
    ),
    "fashion_mnist": DatasetSpec(
        image_classification(fashion_mnist.load_splits), "image", "single_label", "efficientnet-lite0"
    ),
    "cifar10": DatasetSpec(image_classification(cifar10.load_splits), "image", "single_label", "vit"),
    "flair": DatasetSpec(_flair, "image", "multi_label", "vit", natural_users=True),
    "reddit": DatasetSpec(_reddit, "text", "next_token", "gpt2", natural_users=True),
}


def resolved_partition(cfg) -> str:
    """The partition a run uses (partition auto resolved for its data set)."""
    return DATASETS[cfg.dataset].partition_of(cfg)


def load_task(
    name: str,
    data_dir: str,
    tokenizer: Callable[[], tuple[object, str]] | None = None,
    max_length: int = 0,
    augment: bool = False,
) -> Task:
    return DATASETS[name].load(LoadContext(name, data_dir, tokenizer, max_length, augment))


__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DataUnavailable",
    "LoadContext",
    "RawTexts",
    "Split",
    "Task",
    "load_task",
    "resolved_partition",
    "text_classification",
]
