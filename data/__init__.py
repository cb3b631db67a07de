"""Data set registry: each entry loads one Task (splits + objective + natural users, if any).

A DatasetSpec says what the data set feeds the model (text or images), which objective scores it
(objectives.py), which model it trains by default, and whether its examples belong to natural
users (then partition: natural makes each user one client).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from data import bbcnews, cifar10, fashion_mnist, flair, instructions, newsgroups, reddit
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
    settings: dict | None = None  # the data set's own options (DatasetSpec.own_options) and their values


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[LoadContext], Task]
    inputs: str  # "text" | "image"
    objective: str  # "single_label" | "multi_label" | "next_token" (objectives.py)
    default_model: str  # models.MODELS key
    natural_users: bool = False  # examples belong to users (partition: natural)
    default_max_length: int = 0  # tokens per example when max_length is 0 (text)
    own_options: tuple[str, ...] = ()  # options only this data set reads (LoadContext.settings)

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
        "llm_tasks",
    )

    def settings(self, cfg) -> dict:
        return {key: cfg[key] for key in self.own_options}

    def partition_of(self, cfg) -> str:
        """auto: each natural user one client where the data set has users, else a Dirichlet label skew."""
        if cfg.partition != "auto":
            return cfg.partition
        return "natural" if self.natural_users else "dirichlet"

    def skews_categories(self, cfg) -> bool:
        """Whether partition: dirichlet has categories to skew besides single labels."""
        return False

    def has_users(self, cfg) -> bool:
        return self.natural_users

    def check(self, cfg) -> None:
        """The options that depend on what the data set is (ConfigError names the first that does not fit)."""
        partition, name = self.partition_of(cfg), cfg.dataset
        if partition == "natural" and not self.has_users(cfg):
            raise ConfigError(
                f"partition: natural makes each user a client, but dataset {name} has no "
                "users; expected auto, dirichlet or iid"
            )
        if partition == "dirichlet" and self.objective != "single_label" and not self.skews_categories(cfg):
            raise ConfigError(
                f"partition: dirichlet skews single labels, but dataset {name} is "
                f"{self.objective.replace('_', '-')}; expected auto, natural or iid"
            )
        if cfg.clients == 0 and partition != "natural":
            raise ConfigError(
                f"clients: 0 means every user of a natural partition; partition {partition} "
                "needs a number of clients >= 1"
            )
        if not self.own_options and (cfg.data_files or cfg.hf_dataset):
            key = "data_files" if cfg.data_files else "hf_dataset"
            raise ConfigError(
                f"{key}: dataset {name} reads its own files; data_files and hf_dataset name the examples of "
                "dataset: instructions; expected null (or dataset: instructions)"
            )
        if cfg.llm_tasks and self.objective != "next_token":
            raise ConfigError(
                f"llm_tasks: scoring tasks score a causal LM, and dataset {name} trains a classifier; expected "
                "[] or a language-modelling dataset (instructions, reddit)"
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


@dataclass(frozen=True)
class InstructionSpec(DatasetSpec):
    """dataset: instructions (data/instructions.py): users and categories come from columns, so
    which partitions it allows depends on the config."""

    options = (*DatasetSpec.options, *instructions.options)

    def _has(self, cfg, column: str) -> bool:
        return column in (cfg.columns or {})

    def partition_of(self, cfg) -> str:
        """auto: one client per user where the records name users (columns: {user: ...}), else IID (FlowerTune's)."""
        if cfg.partition != "auto":
            return cfg.partition
        return "natural" if self._has(cfg, "user") else "iid"

    def skews_categories(self, cfg) -> bool:
        return self._has(cfg, "category")

    def has_users(self, cfg) -> bool:
        return self._has(cfg, "user")

    def check(self, cfg) -> None:
        partition = self.partition_of(cfg)
        if partition == "natural" and not self._has(cfg, "user"):
            raise ConfigError(
                "partition: natural makes each user a client; dataset instructions needs the records' user "
                "column, columns: {user: COLUMN}; expected auto, iid, or dirichlet with columns: {category: COLUMN}"
            )
        if partition == "dirichlet" and not self._has(cfg, "category"):
            raise ConfigError(
                "partition: dirichlet skews categories; dataset instructions needs the records' category "
                "column, columns: {category: COLUMN}; expected auto or iid"
            )
        unknown = [k for k in cfg.columns or {} if k not in instructions.FIELDS]
        if unknown:
            raise ConfigError(
                f"columns: '{unknown[0]}' is not a field of an instruction record; expected a mapping of "
                f"{', '.join(instructions.FIELDS)} to your column names"
            )
        if bool(cfg.data_files) == bool(cfg.hf_dataset):
            raise ConfigError(
                "dataset: instructions reads its examples from data_files (local files) or hf_dataset (a Hugging "
                f"Face id), exactly one of them; got {'both' if cfg.data_files else 'neither'}"
            )
        DatasetSpec.check(self, cfg)


def _instructions(ctx: LoadContext) -> Task:
    tokenizer, tag = ctx.tokenizer()
    length = ctx.max_length or DATASETS[ctx.name].default_max_length
    loaded = instructions.load(ctx.data_dir, tokenizer, tag, length, ctx.settings)
    columns = ctx.settings["columns"] or {}
    users = categories = names = None
    if "user" in columns:
        users, _ = instructions.indices(loaded.users, "user", columns["user"])
    if "category" in columns:
        categories, names = instructions.indices(loaded.categories, "category", columns["category"])
    return Task(
        ctx.name,
        [],
        train=loaded.splits["train"],
        val=loaded.splits["validation"],
        test=loaded.splits["test"],
        objective=objectives.NextToken(),
        users=users,
        categories=categories,
        category_names=names,
        dropped=loaded.dropped,
    )


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
    # prompt/response pairs; FlowerTune's sequence length
    "instructions": InstructionSpec(
        _instructions, "text", "next_token", "gpt2", default_max_length=512, own_options=instructions.options
    ),
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
    settings: dict | None = None,
) -> Task:
    return DATASETS[name].load(LoadContext(name, data_dir, tokenizer, max_length, augment, settings))


def load_task_for(cfg, tokenizer: Callable[[], tuple[object, str]] | None = None) -> Task:
    """The task a config trains on (its data set, folder, length, augmentation and own options)."""
    spec = DATASETS[cfg.dataset]
    return load_task(cfg.dataset, cfg.data_dir, tokenizer, cfg.max_length, cfg.augment, spec.settings(cfg))


__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DataUnavailable",
    "LoadContext",
    "RawTexts",
    "Split",
    "Task",
    "load_task",
    "load_task_for",
    "resolved_partition",
    "text_classification",
]
