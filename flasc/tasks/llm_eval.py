"""Scoring a causal LM on benchmark files: multiple choice by log-likelihood, and generation.

A scoring task is a data file (.jsonl, .json, .csv, .parquet) of questions, or a YAML file that
names one (`data_files`, relative to the YAML) with its settings:

    name: topics                 # default: the file's name
    kind: multiple_choice        # multiple_choice | generation; default: multiple_choice where rows have choices
    columns: {question: text}    # fields question, input (optional), choices, answer -> the file's columns
    template: plain              # plain | instruction (see below)
    choices_as: letters          # multiple_choice: letters | text
    scorer: exact_match          # generation: exact_match | contains | final_number
    max_new_tokens: 64           # generation: the cap on new tokens (greedy decoding)
    stop: ["\n\n"]               # generation: the output is cut at the first of these
    limit: 0                     # score the first N rows only (0: all)

Multiple choice, the way lm-evaluation-harness scores it: each choice's continuation is scored by
the sum of its tokens' log-probabilities given the prompt; `acc` takes the highest, `acc_norm`
the highest per character of the continuation. The prompt (template plain) is MMLU's as the
harness writes it, "{question}\nA. {choice 0}\nB. {choice 1}\n...\nAnswer:" with continuations
" A", " B", ... (choices_as letters), or "{question}\nAnswer:" with continuations " {choice}"
(choices_as text). Tokens as the harness makes them: a trailing space of the prompt moves to the
continuation, prompt + continuation is tokenized whole and the prompt's own tokens are cut from
its start; the tokenizer's start tokens (Llama's BOS; GPT-2 and Qwen have none) come first.
A row's optional input follows its question after a blank line. With template instruction the
question is the instruction (and the input Alpaca's input) of a prompt written as training wrote
it (data/instructions.py: chat template or the default one, with the tokenizer's start tokens),
and the continuations are the choices' own text (or letters, listed after the question).

Generation: greedy decoding of at most max_new_tokens after the prompt ("Question: {question}\n
Answer:" plain, or the instruction prompt), stopped by the end-of-sequence token or a stop
string; then exact_match (both sides normalised: lower case, punctuation and the articles a, an,
the removed, white space collapsed), contains (the normalised answer occurs in the normalised
output) or final_number (the last number in the output equals the last number in the answer, as
GSM8K's "#### 72"; thousands separators ignored).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flasc.options import ConfigError, read_text, yaml_load
from flasc.tasks.prompts import Conversation, RecordsError, end_token, read_records, render, start_tokens

# the options scoring during a run reads (train_lora.py; evaluate_adapter.py scores a saved adapter)
options = ("llm_tasks", "llm_task_freq", "eval_freq")

KINDS = ("multiple_choice", "generation")
SCORERS = ("exact_match", "contains", "final_number")
LETTERS = string.ascii_uppercase
SETTINGS = (
    "name",
    "kind",
    "data_files",
    "columns",
    "template",
    "choices_as",
    "scorer",
    "max_new_tokens",
    "stop",
    "limit",
)


@dataclass
class ScoringTask:
    name: str
    kind: str
    rows: list[dict]  # question, choices (multiple choice), answer
    template: str = "plain"
    choices_as: str = "letters"
    scorer: str = "exact_match"
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading a task
def _refuse(where, message: str):
    raise ConfigError(f"{where}: {message}")


def load_task_file(path: str) -> ScoringTask:
    """A scoring task from a data file or a YAML file naming one (ConfigError says what is wrong)."""
    path = Path(path)
    settings: dict = {}
    if path.suffix.lower() in (".yaml", ".yml"):
        settings = yaml_load(read_text(path, "a scoring task's YAML file")) or {}
        if not isinstance(settings, dict):
            _refuse(path, "expected a mapping of the task's settings")
        unknown = [k for k in settings if k not in SETTINGS]
        if unknown:
            _refuse(path, f"unknown setting '{unknown[0]}'; expected some of {', '.join(SETTINGS)}")
        if "data_files" not in settings:
            _refuse(path, "data_files names the task's file; it is missing")
        data_path = path.parent / str(settings["data_files"])
    else:
        data_path = path
    try:
        raw = read_records(data_path)
    except RecordsError as e:
        raise ConfigError(str(e)) from None
    columns = dict(settings.get("columns") or {})
    rows = [_row(r, i, columns, data_path) for i, r in enumerate(raw)]
    if not rows:
        _refuse(data_path, "holds no rows to score")
    kind = settings.get("kind") or ("multiple_choice" if rows[0].get("choices") is not None else "generation")
    task = ScoringTask(
        str(settings.get("name") or data_path.stem),
        kind,
        rows[: int(settings["limit"])] if settings.get("limit") else rows,
        settings.get("template", "plain" if kind == "multiple_choice" else "instruction"),
        settings.get("choices_as", "letters"),
        settings.get("scorer", "exact_match"),
        int(settings.get("max_new_tokens", 64)),
        list(settings.get("stop") or []),
    )
    _check(task, path)
    return task


def _row(raw: dict, index: int, columns: dict, where) -> dict:
    col = lambda f: columns.get(f, f)  # noqa: E731
    if col("question") not in raw or col("answer") not in raw:
        _refuse(
            where,
            f"row {index} lacks '{col('question')}' or '{col('answer')}'; name your columns with "
            "columns: {question: .., answer: ..}",
        )
    row = {
        "question": str(raw[col("question")]),
        "answer": raw[col("answer")],
        "input": str(raw.get(col("input")) or ""),
    }
    choices = raw.get(col("choices"))
    if isinstance(choices, str):
        choices = yaml_load(choices)  # a CSV cell
    if choices is not None:
        row["choices"] = [str(c) for c in choices]
    return row


def _check(task: ScoringTask, where) -> None:
    for key, value, allowed in (
        ("kind", task.kind, KINDS),
        ("template", task.template, ("plain", "instruction")),
        ("choices_as", task.choices_as, ("letters", "text")),
        ("scorer", task.scorer, SCORERS),
    ):
        if value not in allowed:
            _refuse(where, f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if task.max_new_tokens < 1:
        _refuse(where, f"max_new_tokens: {task.max_new_tokens}; expected an integer >= 1")
    if task.kind == "multiple_choice":
        for i, row in enumerate(task.rows):
            choices = row.get("choices")
            if not choices or len(choices) < 2:
                _refuse(where, f"row {i} has {len(choices or [])} choices; multiple choice needs at least 2")
            row["answer"] = _answer_index(row["answer"], choices, i, where)


def _answer_index(answer, choices: list[str], i: int, where) -> int:
    """The answer as an index: an integer, a letter (A, B, ...) or the choice's text."""
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    text = str(answer).strip()
    if text.isdigit() and int(text) < len(choices):
        return int(text)
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(text.upper())
    if text in choices:
        return choices.index(text)
    _refuse(where, f"row {i}'s answer {answer!r} is neither an index, a letter nor one of its choices")


# ---------------------------------------------------------------- prompts and tokens
def instruction_prompt(tokenizer, question: str, input: str = "") -> list[int]:
    """The question (and its input) as training writes an instruction's prompt (data/instructions.py), in tokens."""
    prompt, _ = render(tokenizer, Conversation(question, "", input=input))
    head = [] if getattr(tokenizer, "chat_template", None) else start_tokens(tokenizer)
    return head + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def choice_requests(tokenizer, task: ScoringTask, row: dict) -> list[tuple[list[int], list[int], str]]:
    """For each choice: (prompt tokens, continuation tokens, the continuation's text)."""
    choices = row["choices"]
    shown = list(LETTERS[: len(choices)]) if task.choices_as == "letters" else choices
    if task.template == "instruction":
        question = row["question"]
        if task.choices_as == "letters":
            question += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        context = instruction_prompt(tokenizer, question, row.get("input", ""))
        return [(context, tokenizer(s, add_special_tokens=False)["input_ids"], s) for s in shown]
    text = row["question"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if task.choices_as == "letters":
        text += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return [(*_encode_pair(tokenizer, text + "\nAnswer:", " " + s), " " + s) for s in shown]


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces move to the continuation; the whole is
    tokenized (after the tokenizer's start tokens) and the context's tokens cut from its start."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    head = start_tokens(tokenizer)
    whole = head + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = head + tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def continuation_logprobs(
    model, requests: list[tuple[list[int], list[int]]], device, bf16: bool, pad_id: int, batch: int = 16
) -> list[float]:
    """Σ log p(continuation token | everything before it) of each (context, continuation)."""
    from flasc.tasks.evaluation import Hidden, logits_of

    out = []
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        seqs = [(ctx + cont)[-_context_of(model) :] for ctx, cont in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        outputs = logits_of(model, {"input_ids": ids, "attention_mask": mask}, device, bf16)
        for i, (s, (_, cont)) in enumerate(zip(seqs, chunk)):
            n = min(len(cont), len(s) - 1)
            positions = torch.arange(len(s) - 1 - n, len(s) - 1)
            rows = outputs[i, positions]
            logits = rows.logits() if isinstance(rows, Hidden) else rows
            logp = torch.log_softmax(logits.float(), -1)
            wanted = torch.tensor(s[len(s) - n :], device=logp.device)
            out.append(float(logp.gather(-1, wanted.unsqueeze(-1)).sum()))
    return out


def _context_of(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 20)


def score_multiple_choice(model, tokenizer, task: ScoringTask, device, bf16: bool, rows=None) -> dict:
    """acc and acc_norm over the rows (default: all of them); the counts, so shards add up."""
    rows = task.rows if rows is None else rows
    correct = correct_norm = 0
    for row in rows:
        requests = choice_requests(tokenizer, task, row)
        scores = continuation_logprobs(model, [(c, x) for c, x, _ in requests], device, bf16, _pad(tokenizer))
        best = max(range(len(scores)), key=scores.__getitem__)
        norm = [s / max(len(text), 1) for s, (_, _, text) in zip(scores, requests)]
        best_norm = max(range(len(norm)), key=norm.__getitem__)
        correct += best == row["answer"]
        correct_norm += best_norm == row["answer"]
    return {"acc": correct, "acc_norm": correct_norm, "n": len(rows)}


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def generation_prompt(tokenizer, task: ScoringTask, question: str, input: str = "") -> list[int]:
    if task.template == "instruction":
        return instruction_prompt(tokenizer, question, input)
    question = question + (f"\n\n{input}" if input else "")
    return start_tokens(tokenizer) + tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, batch: int = 16) -> list[str]:
    """Greedy continuations of the prompts (left-padded batches), decoded without special tokens."""
    was_training = model.training
    model.eval()
    eos, pad = end_token(tokenizer), _pad(tokenizer)
    texts = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for row in out[:, width:].tolist():
            row = row[: row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return texts


def normalise(text: str) -> str:
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def scored(output: str, answer, scorer: str) -> bool:
    if scorer == "exact_match":
        return normalise(output) == normalise(answer)
    if scorer == "contains":
        return normalise(answer) in normalise(output)
    got, wanted = final_number(output), final_number(answer)
    return got is not None and wanted is not None and math.isclose(got, wanted, rel_tol=0, abs_tol=1e-9)


def cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def score_generation(model, tokenizer, task: ScoringTask, device, rows=None) -> dict:
    rows = task.rows if rows is None else rows
    prompts = [generation_prompt(tokenizer, task, r["question"], r.get("input", "")) for r in rows]
    outputs = [cut_at_stop(t, task.stop) for t in generate(model, tokenizer, prompts, task.max_new_tokens, device)]
    return {task.scorer: sum(scored(o, r["answer"], task.scorer) for o, r in zip(outputs, rows)), "n": len(rows)}


class Counts:
    """Counts that ranks add up (distributed.World.combine)."""

    def __init__(self, values: dict):
        self.values = dict(values)

    def merge(self, other: Counts) -> None:
        for k, v in other.values.items():
            self.values[k] = self.values.get(k, 0) + v


def score(model, tokenizer, task: ScoringTask, device, bf16: bool = False, world=None) -> dict:
    """The task's metrics as fractions of its rows. With a world of N ranks, rank r scores rows
    r, r + N, ... and the counts are added, so the scores are those of one process."""
    rows = task.rows if world is None else task.rows[world.rank :: world.size]
    was_training = model.training
    model.eval()  # no dropout: the scores of the model itself
    try:
        if task.kind == "multiple_choice":
            counts = score_multiple_choice(model, tokenizer, task, device, bf16, rows)
        else:
            counts = score_generation(model, tokenizer, task, device, rows)
    finally:
        model.train(was_training)
    if world is not None:
        counts = world.combine(Counts(counts)).values
    n = max(counts.pop("n"), 1)
    return {k: v / n for k, v in counts.items()}


# ---------------------------------------------------------------- during a run
def check(cfg) -> None:
    """Scoring tasks are scored with an evaluation, and each file must read as a task (its own line
    otherwise); that they need a causal LM, the data set checks (data/__init__.py)."""
    if not cfg.llm_tasks:
        return
    if cfg.llm_task_freq and cfg.llm_task_freq % cfg.eval_freq:
        raise ConfigError(
            f"llm_task_freq: {cfg.llm_task_freq} is not a multiple of eval_freq {cfg.eval_freq}; the tasks are "
            "scored with an evaluation, on the model it evaluates"
        )
    for path in cfg.llm_tasks:
        load_task_file(path)


def metric_key(task: ScoringTask, metric: str) -> str:
    """metrics.jsonl's name of a task's metric: llm_<task>_<metric>."""
    return f"llm_{re.sub(r'[^0-9A-Za-z]+', '_', task.name).strip('_')}_{metric}"


class RunScores:
    """llm_tasks scored on the evaluated server model (the resident model as Evaluation leaves it),
    at the rounds llm_task_freq names (0: the last only)."""

    def __init__(self, cfg, tokenizer, world=None):
        self.tasks = [load_task_file(p) for p in cfg.llm_tasks]
        self.tokenizer, self.world = tokenizer, world
        self.freq, self.rounds = cfg.llm_task_freq, cfg.server_rounds

    def due(self, rnd: int) -> bool:
        last = rnd + 1 == self.rounds
        return bool(self.tasks) and (last or (self.freq > 0 and (rnd + 1) % self.freq == 0))

    def __call__(self, resident) -> dict:
        out = {}
        for task in self.tasks:
            scores = score(resident.model, self.tokenizer, task, resident.device, resident.bf16, self.world)
            out.update({metric_key(task, k): v for k, v in scores.items()})
        return out
