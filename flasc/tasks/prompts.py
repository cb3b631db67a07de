"""Prompt/response text as training and scoring write it: one example as a Conversation, its
prompt by the tokenizer's chat template or the default template (Alpaca's), the tokens a
tokenizer puts first and the one a response ends with; and the records files both read.

docs/llm.md states the templates exactly; data/instructions.py turns records into training
examples with them, flasc/tasks/llm_eval.py writes its scoring prompts with them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


class RecordsError(ValueError):
    """A records file that cannot be read; the message names it and why."""


class PromptError(ValueError):
    """A tokenizer that cannot write prompts and responses as flasc needs them."""


# The default template (no chat template): Alpaca's (Taori et al. 2023), whose two preambles say
# whether an input follows. Earlier turns of a conversation come first as instruction/response pairs.
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass
class Conversation:
    """One example: an optional system prompt, earlier (user, assistant) turns, the last
    instruction (with its input, Alpaca's second field) and the response that is trained."""

    instruction: str
    response: str
    input: str = ""
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    category: str | None = None
    user: str | None = None

    def messages(self) -> list[dict]:
        """The prompt as chat messages (the instruction and its input in one user message)."""
        out = [] if self.system is None else [{"role": "system", "content": self.system}]
        for question, answer in self.history:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        content = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        return [*out, {"role": "user", "content": content}]


# ---------------------------------------------------------------- records files
def read_records(path: Path) -> list[dict]:
    """The rows of one local file (by its suffix: .json, .jsonl, .parquet, .csv)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
                rows = next(iter(rows.values()))  # {"data": [...]} as some data sets ship
            if not isinstance(rows, list):
                raise ValueError("not a list of records")
            return rows
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except FileNotFoundError:
        raise RecordsError(f"{path} not found") from None
    except (OSError, ValueError, UnicodeDecodeError, ImportError) as e:
        raise RecordsError(f"{path} cannot be read as {suffix[1:]} ({e})") from None
    raise RecordsError(f"{path} has suffix {suffix or '(none)'}; expected .json, .jsonl, .parquet or .csv")


# ---------------------------------------------------------------- text and tokens
def default_prompt(c: Conversation) -> str:
    """The default template (the exact text; docs/llm.md shows it)."""
    preamble = c.system if c.system is not None else (PREAMBLE_WITH_INPUT if c.input else PREAMBLE)
    text = preamble + "\n\n"
    for question, answer in c.history:
        text += f"### Instruction:\n{question}\n\n### Response:\n{answer}\n\n"
    text += f"### Instruction:\n{c.instruction}\n\n"
    if c.input:
        text += f"### Input:\n{c.input}\n\n"
    return text + "### Response:\n"


def render(tokenizer, c: Conversation) -> tuple[str, str]:
    """(prompt, response) text: by the tokenizer's chat template when it has one (the response is
    what the template adds for the assistant's turn), else the default template."""
    if getattr(tokenizer, "chat_template", None):
        messages = c.messages()
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": c.response}], tokenize=False)
        if not full.startswith(prompt):
            raise PromptError(
                "the tokenizer's chat template writes a conversation whose prompt is not the start of the "
                "conversation with its response; the response's tokens cannot be told apart"
            )
        return prompt, full[len(prompt) :]
    return default_prompt(c), c.response


def end_token(tokenizer) -> int:
    """The token a response ends with: the tokenizer's end-of-sequence token (BERT-style
    tokenizers, which have none: their separator)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise PromptError("the tokenizer has no end-of-sequence token for responses to end with")
    return int(eos)


def start_tokens(tokenizer) -> list[int]:
    """What the tokenizer puts before a text of its own (Llama's <s>, BERT's [CLS]; GPT-2 and Qwen: nothing)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    whole = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(whole) - len(bare) + 1):
        if whole[i : i + len(bare)] == bare:
            return list(whole[:i])
    return []
