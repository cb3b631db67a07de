"""Instruction data (dataset: instructions): prompt/response pairs for federated instruction tuning.

Where the examples come from: `data_files` (local JSON, JSONL, Parquet or CSV files; a list is
the training split, a mapping names the splits train / validation / test) or `hf_dataset` (a
Hugging Face dataset id, read with `datasets`; needs a network or a copy in its cache). A split
the source lacks is carved from the training examples in a seeded order that is the same for every
run seed (val_fraction and test_fraction of them), so runs of different seeds are scored on the
same examples; train_examples > 0 then keeps a seeded sample of that many training examples.

Shapes (`data_format`, auto: chosen by the columns present), with `columns` renaming
{field: the data set's column}:
- alpaca: instruction, input (may be missing or empty), output;
- messages: a list of {role, content}; the last message is the response (an assistant's), every
  message before it is the prompt;
- prompt_response: prompt, response.
Optional fields of every shape: system (a system prompt), category (partition: dirichlet) and
user (partition: natural).

How a prompt is written and what the loss counts is docs/llm.md's; the templates themselves are
flasc/tasks/prompts.py's (scoring writes its prompts with them too). This module reads the
records (`conversation`: a record -> its turns), tokenizes them (`encode`: truncation, the
labels) and caches the tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.base import DataUnavailable, downloads_allowed
from data.text import save_cache
from flasc.tasks.prompts import (  # noqa: F401  (instructions.X for callers)
    PREAMBLE,
    PREAMBLE_WITH_INPUT,
    Conversation,
    PromptError,
    RecordsError,
    default_prompt,
    end_token,
    read_records,
    render,
    start_tokens,
)

IGNORE = -100  # transformers' label for a position the loss skips
SPLIT_SEED = 0  # carving validation and test examples: fixed, independent of the run's seed
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}
FIELDS = ("instruction", "input", "output", "messages", "prompt", "response", "system", "category", "user")
SHAPES = {"alpaca": ("instruction", "output"), "messages": ("messages",), "prompt_response": ("prompt", "response")}

# the options this data set reads, besides the common ones (data/__init__.py)
options = (
    "hf_dataset",
    "hf_dataset_config",
    "data_files",
    "data_format",
    "columns",
    "val_fraction",
    "test_fraction",
    "train_examples",
)


# ---------------------------------------------------------------- reading records
def _local_splits(data_files: dict[str, list[str]]) -> dict[str, list[dict]]:
    try:
        return {split: [row for p in paths for row in read_records(Path(p))] for split, paths in data_files.items()}
    except RecordsError as e:
        raise DataUnavailable(f"dataset instructions: data_files: {e}") from None


def _hub_splits(hf_id: str, config_name: str | None, data_dir: str) -> dict[str, list[dict]]:
    """A Hugging Face dataset's splits, read with `datasets` (cached under DATA_DIR/instructions/hf)."""
    how = (
        f"fetch it where there is a network (datasets.load_dataset('{hf_id}').save_to_disk, or its data "
        "files) and point data_files at its files, or run once with a network to fill the cache"
    )
    if not downloads_allowed():
        raise DataUnavailable(
            f"dataset instructions: hf_dataset {hf_id} is not read here (FLASC_OFFLINE is set); {how}"
        )
    try:
        import datasets
    except ImportError:
        raise DataUnavailable(
            "dataset instructions: hf_dataset needs the package datasets: pip install -r requirements.txt"
        ) from None
    datasets.logging.set_verbosity_error()
    try:
        loaded = datasets.load_dataset(hf_id, config_name, cache_dir=str(Path(data_dir) / "instructions" / "hf"))
    except Exception as e:  # no network, unknown id, gated data set
        raise DataUnavailable(
            f"dataset instructions: hf_dataset {hf_id} cannot be loaded ({type(e).__name__}); {how}"
        ) from None
    return {name: list(split) for name, split in loaded.items()}


def _canonical_splits(raw: dict[str, list[dict]], where: str) -> dict[str, list[dict]]:
    out = {}
    for split, aliases in SPLIT_ALIASES.items():
        found = [name for name in raw if name in aliases]
        if found:
            out[split] = raw[found[0]]
    if "train" not in out:
        raise DataUnavailable(f"dataset instructions: {where} has no training split (found {', '.join(raw) or 'none'})")
    unknown = [name for name in raw if not any(name in a for a in SPLIT_ALIASES.values())]
    if unknown:
        raise DataUnavailable(
            f"dataset instructions: {where} has a split '{unknown[0]}'; expected train, validation and test"
        )
    return out


def carve(splits: dict[str, list], val_fraction: float, test_fraction: float) -> dict[str, list]:
    """The missing validation / test splits taken from the training examples, in a seeded order
    (SPLIT_SEED): round(fraction · n) each, at least one."""
    train = splits["train"]
    missing = [(s, f) for s, f in (("validation", val_fraction), ("test", test_fraction)) if s not in splits]
    if not missing:
        return splits
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    counts = [max(1, int(round(f * len(train)))) for _, f in missing]
    if sum(counts) >= len(train):
        raise DataUnavailable(
            f"dataset instructions: {len(train)} training examples are too few to hold out "
            f"{' and '.join(s for s, _ in missing)} ({sum(counts)} examples)"
        )
    out, start = dict(splits), 0
    for (split, _), n in zip(missing, counts):
        out[split] = [train[i] for i in sorted(order[start : start + n])]
        start += n
    out["train"] = [train[i] for i in sorted(order[start:])]
    return out


def sample(rows: list, n: int) -> list:
    """n of the rows in a seeded sample, in their order (0 or n >= len: all of them): OpenFedLLM's
    dataset_sample. The same for every run seed, as the carved splits are."""
    if not n or n >= len(rows):
        return rows
    chosen = np.random.default_rng([SPLIT_SEED, 1]).choice(len(rows), n, replace=False)
    return [rows[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- records -> conversations
def shape_of(row: dict, data_format: str, columns: dict[str, str]) -> str:
    if data_format != "auto":
        return data_format
    for shape, needed in SHAPES.items():
        if all(columns.get(f, f) in row for f in needed):
            return shape
    raise DataUnavailable(
        f"dataset instructions: the records have columns {', '.join(map(str, row)) or '(none)'}; data_format auto "
        "expects instruction and output (alpaca), messages, or prompt and response; name yours with "
        "columns: {field: column}"
    )


def _text(row: dict, column: str, index: int, needed: bool = True) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        if needed:
            raise DataUnavailable(f"dataset instructions: record {index} has no '{column}'")
        return ""
    return str(value)


def conversation(row: dict, index: int, shape: str, columns: dict[str, str]) -> Conversation:
    """One record as a Conversation (shape: alpaca | messages | prompt_response)."""
    col = lambda f: columns.get(f, f)  # noqa: E731
    extra = {
        "category": None if col("category") not in row else _text(row, col("category"), index),
        "user": None if col("user") not in row else _text(row, col("user"), index),
    }
    system = row.get(col("system")) or None
    if shape == "alpaca":
        return Conversation(
            _text(row, col("instruction"), index),
            _text(row, col("output"), index),
            _text(row, col("input"), index, needed=False),
            system,
            **extra,
        )
    if shape == "prompt_response":
        return Conversation(_text(row, col("prompt"), index), _text(row, col("response"), index), "", system, **extra)
    messages = row.get(col("messages"))
    if isinstance(messages, str):
        messages = json.loads(messages)  # a CSV cell
    try:
        turns = [(str(m["role"]), str(m["content"])) for m in messages]
    except (TypeError, KeyError):
        raise DataUnavailable(
            f"dataset instructions: record {index}'s messages are not a list of {{role, content}}"
        ) from None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    roles = [r for r, _ in turns]
    if len(turns) < 2 or len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise DataUnavailable(
            f"dataset instructions: record {index}'s messages go {', '.join(roles) or '(none)'}; expected user and "
            "assistant turns in turn (after an optional system message), ending with the assistant's response"
        )
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 2, 2)]
    return Conversation(turns[-2][1], turns[-1][1], "", system, history, **extra)


# ---------------------------------------------------------------- conversations -> text -> tokens
def encode(tokenizer, c: Conversation, max_length: int) -> tuple[list[int], int] | None:
    """(token ids, prompt length) of one example within max_length tokens, or None when its
    response (with its end token) leaves no room for a prompt token.

    The response is never cut. A prompt too long loses tokens from its start, after the start
    tokens (a chat template writes its own): what stays is its end, where the template's cue for
    the response is."""
    prompt, response = render(tokenizer, c)
    templated = bool(getattr(tokenizer, "chat_template", None))
    head = [] if templated else start_tokens(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = end_token(tokenizer)
    if eos not in response_ids[-2:]:  # a chat template ends the turn itself (Qwen: <|im_end|>, a newline)
        response_ids.append(eos)
    room = max_length - len(head) - len(response_ids)
    if room < 1:
        return None
    kept = head + list(prompt_ids[-room:])
    return kept + response_ids, len(kept)


@dataclass
class InstructionSplit:
    """Token ids of prompt + response per example, right-padded; the labels are made per batch
    (IGNORE on the prompt and padding), so the split holds three small tensors."""

    input_ids: torch.Tensor  # (N, L) int32, padded with pad_id
    lengths: torch.Tensor  # (N,) tokens of each example
    prompt_lengths: torch.Tensor  # (N,) of which the prompt
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at idx, trimmed to the longest of them, with their labels."""
        lengths, prompts = self.lengths[idx], self.prompt_lengths[idx]
        width = max(int(lengths.max()), 1) if len(idx) else 1
        ids = self.input_ids[idx, :width].long()
        pos = torch.arange(width).unsqueeze(0)
        mask = pos < lengths.unsqueeze(1)
        labels = torch.where(mask & (pos >= prompts.unsqueeze(1)), ids, torch.full_like(ids, IGNORE))
        return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}

    def response_tokens(self) -> int:
        return int((self.lengths - self.prompt_lengths).sum())


def tokenize_split(tokenizer, examples: list[Conversation], max_length: int) -> tuple[InstructionSplit, list[int]]:
    """The split's tokens and the indices of the examples kept (the others' responses do not fit)."""
    encoded, kept = [], []
    for i, c in enumerate(examples):
        e = encode(tokenizer, c, max_length)
        if e is not None:
            encoded.append(e)
            kept.append(i)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max((len(ids) for ids, _ in encoded), default=1)
    ids = torch.full((len(encoded), width), pad, dtype=torch.int32)
    for row, (tokens, _) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
    lengths = torch.tensor([len(t) for t, _ in encoded], dtype=torch.long)
    prompts = torch.tensor([p for _, p in encoded], dtype=torch.long)
    return InstructionSplit(ids, lengths, prompts, int(pad)), kept


# ---------------------------------------------------------------- the task
@dataclass
class Loaded:
    splits: dict[str, InstructionSplit]
    dropped: dict[str, int]  # per split: examples whose response does not fit in max_length
    categories: list[str | None]  # of the kept training examples
    users: list[str | None]


def _fingerprint(examples: dict[str, list[Conversation]], tokenizer, tag: str, max_length: int) -> str:
    template = getattr(tokenizer, "chat_template", None) or "default"
    h = hashlib.sha1(f"{tag}|{max_length}|{template}|{PREAMBLE}|{PREAMBLE_WITH_INPUT}".encode())
    for split, rows in examples.items():
        h.update(split.encode())
        for c in rows:
            h.update(json.dumps([c.system, c.history, c.instruction, c.input, c.response]).encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def load(data_dir: str, tokenizer, tag: str, max_length: int, settings: dict) -> Loaded:
    """Read, shape, template and tokenize the examples (tokens cached under DATA_DIR/instructions)."""
    where = (
        "data_files" if settings["data_files"] else f"hf_dataset {settings['hf_dataset']}"
    )  # one (InstructionSpec.check)
    raw = (
        _local_splits(settings["data_files"])
        if settings["data_files"]
        else _hub_splits(settings["hf_dataset"], settings["hf_dataset_config"], data_dir)
    )
    raw = carve(_canonical_splits(raw, where), settings["val_fraction"], settings["test_fraction"])
    raw["train"] = sample(raw["train"], settings["train_examples"])
    columns = dict(settings["columns"] or {})
    if not raw["train"]:
        raise DataUnavailable(f"dataset instructions: {where} has no training examples")
    shape = shape_of(raw["train"][0], settings["data_format"], columns)
    examples = {s: [conversation(r, i, shape, columns) for i, r in enumerate(raw[s])] for s in SPLITS}
    key = _fingerprint(examples, tokenizer, tag, max_length)
    path = Path(data_dir) / "instructions" / f"tokens-{key}.pt"
    cached = _read_cache(path)
    if cached is None:
        cached = {}
        for s in SPLITS:
            try:
                split, kept = tokenize_split(tokenizer, examples[s], max_length)
            except PromptError as e:
                raise DataUnavailable(f"dataset instructions: {e}") from None
            cached[s] = {**vars(split), "kept": torch.tensor(kept, dtype=torch.long)}
        save_cache(path, cached, data_dir, "instructions", max_length)
    splits = {s: InstructionSplit(**{k: v for k, v in cached[s].items() if k != "kept"}) for s in SPLITS}
    kept = cached["train"]["kept"].tolist()
    for s in SPLITS:
        if len(splits[s]) == 0:
            raise DataUnavailable(
                f"dataset instructions: no {s} example fits in max_length {max_length} tokens with its whole response; "
                "raise max_length"
            )
    return Loaded(
        splits,
        {s: len(examples[s]) - len(cached[s]["kept"]) for s in SPLITS},
        [examples["train"][i].category for i in kept],
        [examples["train"][i].user for i in kept],
    )


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None


def indices(values: list[str | None], what: str, column: str) -> tuple[np.ndarray, list[str]]:
    """Each example's category (or user) as an index 0..K-1 in order of first appearance, and the names."""
    if any(v is None for v in values):
        raise DataUnavailable(f"dataset instructions: a training record has no {what} column '{column}'")
    names = list(dict.fromkeys(values))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names
