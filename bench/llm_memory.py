"""Peak memory and speed of a federated round on LLM-sized bases: float32, bfloat16 and 4-bit.

    python bench/llm_memory.py                                  # CPU: both shapes, float32 / bfloat16 / 4bit
    python bench/llm_memory.py --shapes qwen2-0.5b --precisions bfloat16,4bit
    python bench/llm_memory.py --device cuda                    # GPU: torch's peak allocation

Random-weight models of the real shapes (no download): Qwen2.5-0.5B's config (24 layers, hidden
896, 151,936-word vocabulary, tied embeddings; 494M parameters) and Llama-3.2-1B's (16 layers,
hidden 2048, 128,256 words, tied; 1.24B), each saved once as a folder and loaded by `model: FOLDER`
as a user's model would be, with LoRA rank 16 on peft's default targets, a sequence-classification
head, the synthetic text task of bench/synthetic.py (32 tokens), one client a round of one step
of 4 examples (the bfloat16 products of a CPU without native bfloat16 are slow: minutes a step at
1B). Every configuration runs in a fresh process, so each peak is its own: the process's
peak resident set (CPU: /proc's VmHWM; it includes Python and torch, alone: `baseline`) or torch's peak
allocation (GPU). `base MB` is the resident model's own storage (parameters and buffers; 4-bit
weights as stored, two values a byte); `held MB` what the process holds after the round (the
peak also counts the weights file's pages mapped while it is read). The clients share that one
base: a round's extra memory is the activations and the adapters' gradients. Compare figures within one invocation only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "qwen2-0.5b": dict(
        cls="Qwen2Config",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        cls="LlamaConfig",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
}
PRECISIONS = {
    "float32": {},
    "bfloat16": {"torch_dtype": "bfloat16"},
    "4bit": {"quantization": "4bit"},  # NF4, double quantization, float32 products
    "4bit-bf16": {"quantization": "4bit", "torch_dtype": "bfloat16"},  # bfloat16 products (GPUs)
}


def make_folder(shape: str, root: Path) -> Path:
    """The shape's random-weight model saved (bfloat16 on disk), with the synthetic task's tokenizer."""
    import torch
    import transformers

    from flasc.models import minilm_dir

    folder = root / shape
    if (folder / "config.json").exists():
        return folder
    spec = dict(SHAPES[shape])
    config = getattr(transformers, spec.pop("cls"))(**spec)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    # MiniLM's WordPiece files: transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer
    # whatever the files say, which reads bench/synthetic.py's word-level tokenizer as no tokens at
    # all (every text empty); MiniLM's vocabulary it reads letter by letter, a token each
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return folder


def _rss_mb(field: str = "VmHWM") -> float:
    """The process's peak (VmHWM) or current (VmRSS) resident set. Not getrusage's ru_maxrss: Linux
    carries it over from the parent's fork, whose peak includes the model it wrote."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(folder: str, precision: str, device: str) -> dict:
    """One configuration, in this (fresh) process."""
    import synthetic
    import torch

    import config
    import train_lora
    from flasc import models

    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    baseline = _rss_mb("VmRSS")
    synthetic.register_tasks(examples_per_client=4)
    overrides = {
        "dataset": "synthetic_text",
        "model": folder,
        "max_length": 32,
        "clients": 6,
        "partition": "iid",  # 4 examples each: 1 step of 4
        "server_batch": 1,
        "lora_rank": 16,
        "lora_alpha": 16,
        "client_batch": 4,
        "gpu": "cpu" if device == "cpu" else "0",
        "data_dir": tempfile.mkdtemp(),
        **PRECISIONS[precision],
    }
    cfg = config.load_config(overrides=overrides)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fed = train_lora.build(cfg, train_lora.pick_device(cfg.gpu))
    built = time.perf_counter()
    after_build = _rss_mb() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    base = sum(t.numel() * t.element_size() for t in [*fed.model.parameters(), *fed.model.buffers()])
    metrics = fed.run_round(0)
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    steps = 1  # 1 client of 4 examples, one minibatch
    return {
        "precision": precision,
        "params": models.describe(fed.model)["total_params"],
        "base_mb": base / 2**20,
        "baseline_mb": baseline if device == "cpu" else 0.0,
        "peak_after_build_mb": after_build,
        "peak_mb": _rss_mb() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20,
        "held_mb": _rss_mb("VmRSS") if device == "cpu" else torch.cuda.memory_allocated() / 2**20,
        "load_s": built - start,
        "step_s": (done - built) / steps,
        "train_loss": metrics["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--folder", help="where the random-weight models are saved (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.device)))
        return
    root = Path(args.folder or tempfile.mkdtemp(prefix="flasc-llm-"))
    print(
        f"{'shape':<11} {'precision':<9} {'params':>7} {'base MB':>8} {'baseline':>8} {'after load':>10} "
        f"{'peak MB':>8} {'held MB':>8} {'load s':>7} {'s/step':>7} {'peak/fp32':>9}"
    )
    for shape in args.shapes.split(","):
        folder = make_folder(shape, root)
        reference = None
        for precision in args.precisions.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--child", str(folder), precision],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(f"{shape:<11} {precision:<9} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            reference = reference or (r["peak_mb"] if precision == "float32" else None)
            ratio = f"{r['peak_mb'] / reference:.2f}" if reference else "-"
            print(
                f"{shape:<11} {precision:<9} {r['params'] / 1e6:>6.0f}M {r['base_mb']:>8.0f} "
                f"{r['baseline_mb']:>8.0f} {r['peak_after_build_mb']:>10.0f} {r['peak_mb']:>8.0f} "
                f"{r['held_mb']:>8.0f} {r['load_s']:>7.1f} {r['step_s']:>7.2f} {ratio:>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
