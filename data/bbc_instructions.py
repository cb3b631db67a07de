"""BBC News as instructions, for the offline demo of federated instruction tuning (docs/llm.md).

    python data/bbc_instructions.py [--out data_cache/bbc_instructions] [--words 60]

Writes, from the embedded BBC News corpus and its fixed split (data/bbcnews.py):
- train.jsonl, validation.jsonl, test.jsonl: Alpaca records, the instruction "Name the topic of
  this article in one word.", the article's first --words words as the input, its topic (business,
  entertainment, politics, sport, tech) as the output, and the topic again as a category column;
- topics.jsonl and topics.yaml: a multiple-choice scoring task (flasc/tasks/llm_eval.py) over the
  test articles, the five topics as choices, scored on the instruction prompt as training writes it;
The demo's model is flasc/models/demo_llm.py's (no pretrained causal LM is installable offline;
with a network, use any Hugging Face one instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTRUCTION = "Name the topic of this article in one word."


def records(words: int) -> tuple[dict[str, list[dict]], list[str]]:
    from data import bbcnews

    raw = bbcnews.load_raw("")
    out = {}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        texts, labels = raw.splits[split]
        out[name] = [
            {
                "instruction": INSTRUCTION,
                "input": " ".join(text.split()[:words]),
                "output": raw.label_names[label],
                "category": raw.label_names[label],
            }
            for text, label in zip(texts, labels)
        ]
    return out, raw.label_names


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data_cache/bbc_instructions", help="the folder written")
    p.add_argument("--words", type=int, default=60, help="words of each article kept as the input")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits, topics = records(args.words)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    questions = [
        {"question": INSTRUCTION, "input": r["input"], "choices": topics, "answer": r["output"]} for r in splits["test"]
    ]
    write_jsonl(out / "topics.jsonl", questions)
    (out / "topics.yaml").write_text(
        "# The test articles' topics as multiple choice, on the prompt training writes (docs/llm.md)\n"
        "name: topics\ndata_files: topics.jsonl\nkind: multiple_choice\ntemplate: instruction\nchoices_as: text\n",
        encoding="utf-8",
    )
    sizes = ", ".join(f"{len(rows)} {name}" for name, rows in splits.items())
    print(f"wrote {out}: {sizes} examples, {len(questions)} multiple-choice questions over {len(topics)} topics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
