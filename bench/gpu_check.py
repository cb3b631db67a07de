"""Does the CUDA path compute what the CPU path computes, and how fast is it? One script for a GPU
machine with no data, no weights and no network (synthetic tasks and random-weight models from
bench/synthetic.py).

1. correctness: every config of `--list-configs` (the shipped ones and the paper presets), and a
   few extra settings (each model family, DP, tiers), runs `--rounds` rounds with a tiny model of
   its model's family on a synthetic task of its data set's kind:
   - on the CPU in fp32 (the reference), then on the device in fp32 (TF32 off), with dropout off
     (CUDA draws dropout masks from its own generator, so they would differ by design); every metric must be
     finite, each loss within a relative TOLERANCE of the CPU run's, and the final server vector
     within TOLERANCE of it in relative L2 distance;
   - on the device in bf16, as configured (dropout on): every metric finite.
2. determinism: each model family twice with `deterministic: true` on the device: identical metrics.
   together: each family that can stack adapters with clients trained one at a time and three at a
   time (client_parallelism 3) on the device in fp32, dropout on: each client draws its dropout masks
   from its own CUDA generator state, so the runs must agree within TOLERANCE.
3. speed: rounds of size-realistic random models (MiniLM-, GPT-2-small-, ViT-B/16-shaped; LoRA
   rank 16; the FLASC code's batch 16 and 10 clients a round) in fp32 and bf16: client updates per
   second and peak GPU memory.

    python bench/gpu_check.py                          # on CUDA: everything, a report at the end
    python bench/gpu_check.py --device cpu --shapes tiny --configs fedavg,dare   # the script's own test
    python bench/gpu_check.py --dry-run                # what would run

It needs PyTorch, transformers, tokenizers, peft, scikit-learn, tensorboard, tqdm, pyyaml and, of
flasc's other requirements, loguru (and dp-accounting for the DP check, efficientnet-lite-pytorch
for the EfficientNet family, which is skipped without it). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

# deterministic runs need cuBLAS's workspace fixed before the first CUDA matrix product
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synthetic  # noqa: E402
import torch  # noqa: E402

import config as config_mod  # noqa: E402
import data  # noqa: E402
import train_lora  # noqa: E402
from flasc import models  # noqa: E402
from flasc.runtime import checkpoint  # noqa: E402

TOLERANCE = 1e-3  # relative, device fp32 against CPU fp32 (losses and the final server vector)
TINY = {"bert": "tiny-bert", "gpt2": "tiny-gpt2", "vit": "tiny-vit", "efficientnet": "tiny-efficientnet"}
# Settings no shipped config covers, run like the configs (on the data set of their overrides).
EXTRAS = {
    "fedavg@20newsgroups": ("fedavg", {"dataset": "20newsgroups"}),
    "fedavg@fashion_mnist": ("fedavg", {"dataset": "fashion_mnist"}),
    "fedavg@flair": ("fedavg", {"dataset": "flair"}),
    "fedavg@reddit": ("fedavg", {"dataset": "reddit"}),
    "dp_flasc": ("flasc", {"l2_clip_norm": 0.5, "noise_multiplier": 0.5, "dp_divide_by_clip": True}),
    "full_finetuning_fedprox": ("fedprox", {"lora_rank": -1, "client_freeze": True, "dl_density": 0.5}),
    "tiers_density": ("flasc", {"tiers": 2, "syshet": "density"}),
    # the baselines' own configs run as configs; these add their rank tiers and client-state paths
    "flexlora_tiers": ("flexlora", {"tiers": 2}),
    "hetlora_tiers_prune": ("hetlora", {"tiers": 2, "hetlora_prune": True}),
    "flora_tiers": ("flora", {"tiers": 2}),
    "fedsa_personalized": ("fedsa", {"eval_personalized": True}),
    "fedavg_together": ("fedavg", {"client_parallelism": 3}),  # stacked adapters, against the CPU
}
FAMILIES = ["fedavg", "fedavg@20newsgroups", "fedavg@fashion_mnist", "fedavg@flair", "fedavg@reddit"]


# ---------------------------------------------------------------- one small run
class Workspace:
    """Temporary data, runs and tokenizers for the whole check."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = synthetic.write_tokenizer(root / "tokenizer", 1000)
        self.real_to_synthetic = synthetic.register_tasks()
        self.count = 0

    def overrides(self, name: str, extra: dict, device: str, bf16: bool, rounds: int) -> dict:
        """The config's own values with its data set and model swapped for synthetic / tiny ones."""
        base = config_mod.load_config(name, extra)
        family = models.MODELS[models.resolve_name(base)].family
        dataset = self.real_to_synthetic[base.dataset]
        spec = data.DATASETS[dataset]
        small = {
            "dataset": dataset,
            "model": TINY[family],
            "data_dir": str(self.root / "data"),
            "server_rounds": rounds,
            "eval_freq": 1,
            "client_batch": 8,
            "eval_batch": 16,
            "clients": 0 if spec.natural_users else 6,
            "server_batch": 3,
            "gpu": device,
            "bf16": bf16,
            "max_length": 16 if spec.inputs == "text" else 0,
            "augment": False,
            "dir": str(self.root / "runs"),
        }
        if models.MODELS[TINY[family]].inputs == "text":
            small["model_path"] = str(self.tokenizer)
        if base.tiers > 1 and base.syshet != "density":
            small["lora_rank"] = max(base.lora_rank, 4 ** (base.tiers - 1))
        if base.lora_rank > 16:
            small["lora_rank"] = 16
        return small

    def run(self, name: str, extra: dict, **settings) -> tuple[list[dict], torch.Tensor]:
        """One run through train_lora.train; its metrics.jsonl records and final server vector."""
        self.count += 1
        cfg = config_mod.load_config(name, {**extra, **settings, "name": f"run{self.count}"})
        with contextlib.redirect_stderr(io.StringIO()):
            run_dir = train_lora.train(cfg)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        server = checkpoint.read(run_dir / "checkpoint.pt")["federation"]["server"]
        return records, server


def _is_metric(key: str, value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and "seconds" not in key


def finite(records: list[dict]) -> list[str]:
    return [
        f"round {r['round']} {k}={v}"
        for r in records
        for k, v in r.items()
        if _is_metric(k, v) and not math.isfinite(v)
    ]


def compare(
    reference: list[dict],
    other: list[dict],
    ref_server: torch.Tensor,
    server: torch.Tensor,
    tolerance: float = TOLERANCE,
) -> tuple[float, list[str]]:
    """The largest relative difference over the losses and the server vector, and what exceeds it."""
    problems, worst = [], 0.0
    for a, b in zip(reference, other):
        for key in (k for k in a if k.endswith("loss")):
            rel = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            worst = max(worst, rel)
            if not rel <= tolerance:
                problems.append(f"round {a['round']} {key}: {b[key]:.6g} vs CPU {a[key]:.6g} (rel {rel:.2e})")
    if len(reference) != len(other):
        problems.append(f"{len(other)} records vs CPU {len(reference)}")
    rel = float((server.float() - ref_server.float()).norm() / ref_server.float().norm().clamp_min(1e-12))
    worst = max(worst, rel)
    if not rel <= tolerance:
        problems.append(f"final server vector: relative L2 distance {rel:.2e} from the CPU run's")
    return worst, problems


@contextlib.contextmanager
def full_fp32():
    """TF32 off while the GPU fp32 run is compared with the CPU: cuDNN convolutions default to
    TF32 (10-bit mantissas), which is a precision choice, not what this check is about."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------- the checks
def prepared(ws: Workspace, check: str, label: str, device: str, rounds: int):
    """(report row, config name, its extra overrides, the small overrides); the last is None, and the
    row says skipped, where the config needs a package that is missing."""
    name, extra = EXTRAS.get(label, (label, {}))
    row = {"check": check, "name": label}
    try:
        return row, name, extra, ws.overrides(name, extra, device, False, rounds)
    except ModuleNotFoundError as e:
        return {**row, "status": "skipped", "detail": f"needs the package {e.name}"}, name, extra, None


def check_config(ws: Workspace, label: str, device: str, rounds: int) -> dict:
    row, name, extra, small = prepared(ws, "correctness", label, device, rounds)
    if small is None:
        return row
    no_dropout = {"lora_dropout": 0.0, "base_dropout": False}
    cpu = ws.run(name, {**extra, **small, **no_dropout}, gpu="cpu")
    with full_fp32():
        dev = ws.run(name, {**extra, **small, **no_dropout}, gpu=device)
    bf16 = ws.run(name, {**extra, **small}, gpu=device, bf16=True)
    worst, problems = compare(*cpu[:1], *dev[:1], cpu[1], dev[1])
    problems += [f"fp32: {p}" for p in finite(dev[0])] + [f"bf16: {p}" for p in finite(bf16[0])]
    return {
        **row,
        "status": "ok" if not problems else "FAILED",
        "max_rel_diff": worst,
        "detail": "; ".join(problems[:3]),
    }


def check_determinism(ws: Workspace, label: str, device: str, rounds: int) -> dict:
    row, name, extra, small = prepared(ws, "determinism", label, device, rounds)
    if small is None:
        return row
    strip = lambda recs: [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]  # noqa: E731
    try:
        a, b = (ws.run(name, {**extra, **small}, deterministic=True) for _ in range(2))
    except config_mod.ConfigError as e:
        return {**row, "status": "FAILED", "detail": str(e)}
    same = strip(a[0]) == strip(b[0]) and torch.equal(a[1], b[1])
    return {
        **row,
        "status": "ok" if same else "FAILED",
        "detail": "" if same else "two deterministic runs of one seed differ",
    }


def check_together(ws: Workspace, label: str, device: str, rounds: int) -> dict:
    """One client at a time against three at a time, on the device, dropout on (as configured)."""
    row, name, extra, small = prepared(ws, "together", label, device, rounds)
    if small is None:
        return row
    try:
        with full_fp32():
            one, three = (ws.run(name, {**extra, **small, "client_parallelism": k}) for k in (1, 3))
    except config_mod.ConfigError as e:
        return {**row, "status": "skipped", "detail": str(e).split(";")[0]}
    worst, problems = compare(one[0], three[0], one[1], three[1])
    return {
        **row,
        "status": "ok" if not problems else "FAILED",
        "max_rel_diff": worst,
        "detail": "; ".join(problems[:3]),
    }


def time_shape(
    ws: Workspace,
    shape: str,
    device: torch.device,
    bf16: bool,
    rounds: int,
    clients: int = 10,
    examples: int = 80,
    length: int = 128,
) -> dict:
    """Median seconds of a training round (warm-up round excluded) of a LoRA rank-16 fedavg round."""
    dataset = {
        "minilm-shape": "synthetic_text30522",
        "gpt2-shape": "synthetic_text50257",
        "vit-shape": "synthetic_image_timing",
        "tiny-bert": "synthetic_text30522",
        "tiny-gpt2": "synthetic_text50257",
        "tiny-vit": "synthetic_image_timing",
    }[shape]
    settings = {
        "dataset": dataset,
        "model": shape,
        "clients": clients,
        "server_batch": clients,
        "partition": "iid",
        "client_batch": 16,
        "lora_rank": 16,
        "lora_alpha": 16,
        "max_length": length if "text" in dataset else 0,
        "data_dir": str(ws.root / "data"),
        "gpu": "cpu" if device.type == "cpu" else str(device.index or 0),
        "bf16": bf16,
        "server_rounds": rounds + 1,
    }
    if shape.startswith("tiny-") and "text" in dataset:
        settings["model_path"] = models.MODELS["minilm-shape" if "30522" in dataset else "gpt2-shape"].source()
    cfg = config_mod.load_config("fedavg", settings)
    fed = train_lora.build(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fed.run_round(0)  # warm-up: kernels, allocator, caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for rnd in range(1, rounds + 1):
        sync()
        t0 = time.perf_counter()
        fed.run_round(rnd)
        sync()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    stands_for = synthetic.SHAPES[shape][3] if shape in synthetic.SHAPES else shape
    return {
        "check": "speed",
        "name": f"{stands_for}, {'bf16' if bf16 else 'fp32'}",
        "status": "ok",
        "trainable": fed.flat.numel,
        "round_s": seconds,
        "client_updates_per_s": clients / seconds,
        "examples_per_s": clients * examples / seconds,
        "peak_gpu_gib": memory,
    }


# ---------------------------------------------------------------- the report
def report(rows: list[dict], device: str) -> str:
    lines = [f"flasc GPU check on {device}", ""]
    checks = [r for r in rows if r["check"] != "speed"]
    if checks:
        lines += ["| check | config | status | max rel. diff vs CPU | detail |", "|---|---|---|---|---|"]
        for r in checks:
            diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
            lines.append(f"| {r['check']} | {r['name']} | {r['status']} | {diff} | {r.get('detail', '')} |")
        lines.append("")
    speed = [r for r in rows if r["check"] == "speed"]
    if speed:
        lines += [
            "| model (random weights), precision | trainable | s / round | client updates / s | "
            "examples / s | peak GPU GiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in speed:
            lines.append(
                f"| {r['name']} | {r['trainable']:,} | {r['round_s']:.3f} | {r['client_updates_per_s']:.1f} | "
                f"{r['examples_per_s']:.0f} | "
                f"{'-' if r['peak_gpu_gib'] is None else format(r['peak_gpu_gib'], '.2f')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a test of this script)")
    parser.add_argument("--configs", help="comma-separated configs and extras (default: all of them)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each correctness run")
    parser.add_argument(
        "--shapes",
        choices=["realistic", "tiny"],
        default="realistic",
        help="models timed: the real architectures' sizes, or tiny ones (CPU tests)",
    )
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument(
        "--timing-clients", type=int, default=10, help="clients of a timed round (80 examples each; CPU tests: fewer)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip: correctness, determinism, together, speed"
    )
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="list what would run")
    args = parser.parse_args(argv)

    names = list(config_mod.list_configs()) + list(EXTRAS)
    if args.configs:
        wanted = args.configs.split(",")
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(
                f"error: --configs: unknown {', '.join(unknown)}; expected some of {', '.join(names)}", file=sys.stderr
            )
            return 2
        names = wanted
    skip = set(filter(None, args.skip.split(",")))
    parts = {"correctness", "determinism", "together", "speed"}
    if skip - parts:
        print(
            f"error: --skip: unknown {', '.join(sorted(skip - parts))}; "
            "expected correctness, determinism, together, speed",
            file=sys.stderr,
        )
        return 2
    shapes = list(synthetic.SHAPES) if args.shapes == "realistic" else ["tiny-bert", "tiny-gpt2", "tiny-vit"]
    families = [n for n in FAMILIES if not args.configs or n in names] or names[:1]
    if args.dry_run:
        print("correctness:", ", ".join(names) if "correctness" not in skip else "skipped")
        print("determinism:", ", ".join(families) if "determinism" not in skip else "skipped")
        print("together:", ", ".join(families) if "together" not in skip else "skipped")
        print("speed:", ", ".join(shapes) if "speed" not in skip else "skipped")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible; use --device cpu to test the script", file=sys.stderr)
        return 2

    from loguru import logger

    logger.remove()  # the runs' own logs stay in their (temporary) run folders
    gpu = "cpu" if device.type == "cpu" else str(device.index or 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        synthetic.register_shapes(Path(tmp) / "shape_tokenizers")
        synthetic.register_timing_tasks(examples_per_client=80, clients=args.timing_clients, length=128)
        jobs = []
        if "correctness" not in skip:
            jobs += [("correctness", n) for n in names]
        if "determinism" not in skip:
            jobs += [("determinism", n) for n in families]
        if "together" not in skip:
            jobs += [("together", n) for n in families]
        if "speed" not in skip:
            jobs += [("speed", (s, bf16)) for s in shapes for bf16 in (False, True)]
        for kind, what in jobs:
            t0 = time.perf_counter()
            try:
                if kind == "correctness":
                    row = check_config(ws, what, gpu, args.rounds)
                elif kind == "determinism":
                    row = check_determinism(ws, what, gpu, args.rounds)
                elif kind == "together":
                    row = check_together(ws, what, gpu, args.rounds)
                else:
                    row = time_shape(ws, what[0], device, what[1], args.timing_rounds, args.timing_clients)
            except Exception as e:  # report every failure, then go on with the next check
                row = {
                    "check": kind,
                    "name": str(what),
                    "status": "FAILED",
                    "detail": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                }
                traceback.print_exc()
            print(
                f"[{time.perf_counter() - t0:6.1f} s] {kind} {row['name']}: {row['status']} {row.get('detail', '')}",
                flush=True,
            )
            rows.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("\n" + report(rows, name))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": name, "tolerance": TOLERANCE, "rows": rows}, indent=1, allow_nan=False)
        )
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
