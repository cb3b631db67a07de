"""BBC News as instructions, for the offline demo of federated instruction tuning (docs/llm.md).

    python data/bbc_instructions.py [--out data_cache/bbc_instructions] [--words 60] [--tiny-model]

Writes, from the embedded BBC News corpus and its fixed split (data/bbcnews.py):
- train.jsonl, validation.jsonl, test.jsonl: Alpaca records, the instruction "Name the topic of
  this article in one word.", the article's first --words words as the input, its topic (business,
  entertainment, politics, sport, tech) as the output, and the topic again as a category column;
- topics.jsonl and topics.yaml: a multiple-choice scoring task (flasc/tasks/llm_eval.py) over the
  test articles, the five topics as choices, scored on the instruction prompt as training writes it;
- with --tiny-model: tiny_llama/, a Llama of random weights (hidden 64, 2 layers; its output
  layer drawn with std 0.5, see tiny_llama) with MiniLM's
  vocabulary as a causal LM's tokenizer ([CLS] begins a text, [SEP] ends a response). No
  pretrained causal LM is installable offline; with a network, use any Hugging Face one instead.
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


def tiny_llama(folder: Path) -> None:
    """A random-weight Llama (seed 0) and MiniLM's vocabulary made a causal LM's tokenizer."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flasc.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok._tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", tok.cls_token_id)])
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # A frozen output layer of std 0.02 on a normalised 64-wide state spans logits of about ±1,
    # too little to lift one word above 30,000; std 0.5 lets LoRA's change of the state do it.
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data_cache/bbc_instructions", help="the folder written")
    p.add_argument("--words", type=int, default=60, help="words of each article kept as the input")
    p.add_argument("--tiny-model", action="store_true", help="also write tiny_llama/, a random-weight Llama")
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
    if args.tiny_model:
        tiny_llama(out / "tiny_llama")
    sizes = ", ".join(f"{len(rows)} {name}" for name, rows in splits.items())
    print(f"wrote {out}: {sizes} examples, {len(questions)} multiple-choice questions over {len(topics)} topics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
