"""Client updates per second with clients trained together (client_parallelism K), against one at a time.

    python bench/client_parallel.py                       # CPU: the embedded default (MiniLM-L6, BBC News)
    python bench/client_parallel.py --device cuda         # GPU: MiniLM-, GPT-2-small-, ViT-B/16-shaped models
    python bench/client_parallel.py --ks 1,2,5,10 --reps 3

For each model, one federation is built and its round-1 clients (10 of them) are trained again and
again: the client work of a round (ClientWorker.train_group: local training and the upload chain),
the same clients, minibatches and dropout draws for every K. First one pass per K in increasing K,
which warms up and measures peak memory (GPU: torch's peak allocation; CPU: the process's peak
resident set, reset before each K through /proc/self/clear_refs, so it includes the resident model);
then `--reps` passes with the Ks interleaved, timed. Updates per second = clients / median seconds
of a pass. Ratios are to K = 1 of the same invocation (the machines are noisy: compare within one
run only). The ceiling column is what stacking can gain at most: the plain model's forward and
backward over K clients' minibatches concatenated, against K passes over them one by one.

CPU: the embedded default as `fedavg` runs it (LoRA rank 16, batch 16, 128 tokens, dropout on),
with 10 clients a round. GPU: random-weight models of the real sizes (bench/synthetic.py), LoRA
rank 16, batch 16, 128 tokens or 224 px, 10 clients of 80 examples, fp32 (and bf16 with --bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import config as config_mod  # noqa: E402
import train_lora  # noqa: E402
from flasc import models  # noqa: E402

SHAPE_TASKS = {
    "minilm-shape": "synthetic_text30522",
    "gpt2-shape": "synthetic_text50257",
    "vit-shape": "synthetic_image_timing",  # tiny ones: a quick test of this script on a CPU
    "tiny-bert": "synthetic_text30522",
    "tiny-gpt2": "synthetic_text50257",
    "tiny-vit": "synthetic_image_timing",
}


def peak_rss_reset() -> bool:
    """Reset this process's peak resident set to its current size (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    """One federation; its round-1 client work run at any K."""

    def __init__(self, cfg, device: torch.device):
        self.fed = train_lora.build(cfg, device)
        self.cfg, self.device = cfg, device
        self.jobs = self.fed.plan_round(1).jobs

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def work(self, k: int) -> float:
        """Seconds of the round's client work with k clients at a time."""
        self.fed.worker.cfg = config_mod.from_mapping({**self.cfg, "client_parallelism": k})
        self.sync()
        t0 = time.perf_counter()
        self.fed.worker.train_group(1, self.jobs)
        self.sync()
        return time.perf_counter() - t0

    def ceiling(self, k: int, reps: int = 3) -> float:
        """How much faster the plain model runs one forward/backward over k clients' first
        minibatches concatenated than k passes over them one by one: what stacking can gain at most."""
        from flasc.client import stacked
        from flasc.tasks.evaluation import logits_of

        model, objective = self.fed.model, self.fed.task.objective
        batches = [next(self.fed.worker.client_batches(1, job.client_id)) for job in self.jobs[:k]]
        joined = stacked.concatenate(batches, getattr(model.config, "pad_token_id", None))[0]

        def passes(group):
            self.sync()
            t0 = time.perf_counter()
            for batch in group:
                objective.loss(logits_of(model, batch, self.device, self.cfg.bf16), batch).backward()
            self.sync()
            return time.perf_counter() - t0

        models.training_mode(model, self.cfg.base_dropout)
        model.zero_grad(set_to_none=True)
        ratios = [passes(batches) / passes([joined]) for _ in range(reps + 1)][1:]  # the first warms up
        model.zero_grad(set_to_none=True)
        return statistics.median(ratios)

    def memory(self, k: int) -> float | None:
        """Peak memory (MB) of one pass at k: GPU allocation, or the CPU process's resident set."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.work(k)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        reset = peak_rss_reset()
        self.work(k)
        return peak_rss_mb() if reset else None


def measure(label: str, cfg, device: torch.device, ks: list[int], reps: int) -> list[dict]:
    bench = Bench(cfg, device)
    clients = len(bench.jobs)
    memory = {k: bench.memory(k) for k in ks}  # also the warm-up of every K
    times = {k: [] for k in ks}
    for _ in range(reps):
        for k in ks:
            times[k].append(bench.work(k))
    rows = []
    for k in ks:
        rate = clients / statistics.median(times[k])
        rows.append(
            {
                "model": label,
                "k": k,
                "updates_per_s": rate,
                "peak_mb": memory[k],
                "ratio": rate * statistics.median(times[ks[0]]) / clients,
                "ceiling": bench.ceiling(k) if k > 1 else 1.0,
            }
        )
        mem = "-" if memory[k] is None else f"{memory[k]:.0f}"
        print(
            f"{label}, K={k}: {rate:.3f} client updates/s, {rows[-1]['ratio']:.2f}x K={ks[0]} "
            f"(plain model, one pass of K minibatches: {rows[-1]['ceiling']:.2f}x), peak {mem} MB",
            flush=True,
        )
    return rows


def cpu_config():
    return config_mod.load_config("fedavg", {"server_batch": 10, "gpu": "cpu"})


def gpu_configs(root: Path, device: torch.device, bf16: bool, shapes: list[str]):
    import synthetic

    synthetic.register_shapes(root / "tokenizers")
    synthetic.register_timing_tasks(80, 10, 128)
    for shape in shapes:
        dataset = SHAPE_TASKS[shape]
        settings = {
            "dataset": dataset,
            "model": shape,
            "clients": 10,
            "server_batch": 10,
            "partition": "iid",
            "client_batch": 16,
            "lora_rank": 16,
            "lora_alpha": 16,
            "max_length": 128 if "text" in dataset else 0,
            "data_dir": str(root / "data"),
            "gpu": "cpu" if device.type == "cpu" else str(device.index or 0),
            "bf16": bf16,
        }
        if shape.startswith("tiny-") and "text" in dataset:  # the shapes' tokenizer of that vocabulary
            settings["model_path"] = models.MODELS["minilm-shape" if "30522" in dataset else "gpt2-shape"].source()
        stands_for = synthetic.SHAPES[shape][3] if shape in synthetic.SHAPES else shape
        yield f"{stands_for}, {'bf16' if bf16 else 'fp32'}", config_mod.load_config("fedavg", settings)


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"client_parallelism on {device}",
        "",
        "| model | K | client updates / s | vs K = 1 | ceiling | peak memory MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"| {r['model']} | {r['k']} | {r['updates_per_s']:.3f} | {r['ratio']:.2f} | {r['ceiling']:.2f} | {mem} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (the embedded default) or cuda / cuda:N (shapes)")
    parser.add_argument("--ks", default="1,2,5,10", help="comma-separated K values; the first is the baseline")
    parser.add_argument("--reps", type=int, default=2, help="timed passes per K")
    parser.add_argument(
        "--shapes",
        default="minilm-shape,gpt2-shape,vit-shape",
        help="random-weight models timed (GPU, or CPU with --synthetic)",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="CPU: the random-weight models, not the embedded default"
    )
    parser.add_argument("--bf16", action="store_true", help="GPU: also bf16 autocast")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    device = torch.device(args.device)
    rows = []
    if device.type == "cpu" and not args.synthetic:
        rows += measure("MiniLM-L6 on BBC News (embedded default), fp32", cpu_config(), device, ks, args.reps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for bf16 in [False, True] if args.bf16 else [False]:
                for label, cfg in gpu_configs(Path(tmp), device, bf16, args.shapes.split(",")):
                    rows += measure(label, cfg, device, ks, args.reps)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(table(rows, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
