"""Tokens per second and peak memory of federated instruction tuning on a 0.5B LLM.

    python bench/llm_throughput.py                                   # CPU: float32, bfloat16, 4bit
    python bench/llm_throughput.py --precisions 4bit --steps 2 --batch 1
    python bench/llm_throughput.py --device cuda --batch 16          # GPU: with model-FLOPs utilisation

A Qwen2.5-0.5B-shaped causal LM of random weights (bench/llm_memory.py's shape: 24 layers, hidden
896, 151,936 words, tied embeddings) trained as dataset instructions trains it: sequences of
--length tokens (512: the prompt cut to fit, a 129-token response with its end token), LoRA rank 16 on peft's
default modules, one client taking --steps local steps of --batch sequences (AdamW), the loss
on the response tokens with the output layer applied in chunks. Each precision runs in a fresh
process, so each peak is its own (CPU: the process's VmHWM, Python and torch included; GPU:
torch's peak allocation). tokens/s counts every token of the sequences the steps process
(prompt and response: the forward pass reads them all). MFU (GPU) = 6 · parameters · tokens/s
over the chip's dense bfloat16 peak (--peak-tflops, H200: 989), the usual estimate; with LoRA
the backward pass skips the frozen weights' gradients, so it overstates the work done.
Compare figures within one invocation only.
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

PRECISIONS = {
    "float32": {},
    "bfloat16": {"torch_dtype": "bfloat16"},
    "4bit": {"quantization": "4bit"},  # NF4, float32 products
    "4bit-bf16": {"quantization": "4bit", "torch_dtype": "bfloat16"},
}


def write_data(folder: Path, examples: int, prompt_tokens: int, response_tokens: int) -> Path:
    """Alpaca records of random letters, one token each (llm_memory.py's folder: MiniLM's
    vocabulary, read letter by letter by the Qwen2 tokenizer transformers picks)."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    path = folder / "records.jsonl"
    with path.open("w") as f:
        for _ in range(examples):
            text = lambda n: "".join(rng.choice(letters, n))  # noqa: E731
            f.write(json.dumps({"instruction": text(prompt_tokens), "output": text(response_tokens)}) + "\n")
    return path


def model_folder(root: Path) -> Path:
    """llm_memory.py's Qwen2-0.5B-shaped folder."""
    from llm_memory import make_folder

    return make_folder("qwen2-0.5b", root)


def measure(folder: str, precision: str, args) -> dict:
    """One precision, in this (fresh) process."""
    import torch
    from llm_memory import _rss_mb

    import config
    import train_lora
    from flasc import models

    Path("/proc/self/clear_refs").write_text("5")
    data_dir = Path(tempfile.mkdtemp())
    records = write_data(data_dir, 40 * args.batch * args.steps, args.length, args.length // 4)
    overrides = {
        "dataset": "instructions",
        "data_files": str(records),
        "model": folder,
        "max_length": args.length,
        "clients": 1,
        "server_batch": 1,
        "lora_rank": 16,
        "lora_alpha": 32,
        "client_batch": args.batch,
        "client_steps": args.steps,
        "client_opt": "adamw",
        "client_lr": 1e-4,
        "drift_stats": False,
        "gpu": "cpu" if args.device == "cpu" else "0",
        "data_dir": str(data_dir),
        **PRECISIONS[precision],
    }
    cfg = config.load_config(overrides=overrides)
    fed = train_lora.build(cfg, train_lora.pick_device(cfg.gpu))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    job = fed.plan_round(0).jobs[0]
    tokens = sum(
        int(b["attention_mask"].sum()) for _, b in zip(range(args.steps), fed.worker.client_batches(0, job.client_id))
    )
    start = time.perf_counter()
    _, metrics = fed.worker.train_job(0, job)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    params = models.describe(fed.model)["total_params"]
    out = {
        "precision": precision,
        "params": params,
        "steps": metrics["steps"],
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mb": _rss_mb() if args.device == "cpu" else torch.cuda.max_memory_allocated() / 2**20,
        "chunked_output_layer": getattr(fed.model, "flasc_lm", None) is not None,
    }
    if args.device == "cuda":
        out["mfu"] = 6 * params * out["tokens_per_s"] / (args.peak_tflops * 1e12)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="float32,bfloat16,4bit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--length", type=int, default=512, help="tokens a sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences a step")
    parser.add_argument("--steps", type=int, default=2, help="local steps timed")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak (MFU)")
    parser.add_argument("--folder", help="where the random-weight model is saved (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.folder, args.child, args)))
        return
    folder = model_folder(Path(args.folder or tempfile.mkdtemp(prefix="flasc-llm-")))
    print(f"{'precision':<10} {'params':>7} {'tokens':>7} {'s':>8} {'tokens/s':>9} {'peak MB':>8} {'MFU':>6}")
    for precision in args.precisions.split(","):
        cmd = [sys.executable, __file__, "--child", precision, "--folder", str(folder), "--device", args.device]
        cmd += ["--length", str(args.length), "--batch", str(args.batch), "--steps", str(args.steps)]
        cmd += ["--peak-tflops", str(args.peak_tflops)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{precision:<10} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        print(
            f"{precision:<10} {r['params'] / 1e6:>6.0f}M {r['tokens']:>7} {r['seconds']:>8.1f} "
            f"{r['tokens_per_s']:>9.2f} {r['peak_mb']:>8.0f} {mfu:>6}",
            flush=True,
        )


if __name__ == "__main__":
    main()
