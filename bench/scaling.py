"""Client updates per second of one run spread over processes (torchrun), against one process.

    python bench/scaling.py                        # CPU: 1 process x T threads vs T processes x 1 thread
    python bench/scaling.py --gpu --max-procs 4    # one GPU: 1, 2, 3, 4 processes sharing it
    python bench/scaling.py -- --config flasc      # train_lora.py options after --

Each setting runs train_lora.py on the same work (the embedded default, fedavg, 8 clients a round,
4 rounds unless options after -- say otherwise) and reads the run's metrics.jsonl: updates per
second = clients trained / seconds of the rounds (plan, client work, exchange, reduce, server step;
evaluation excluded), the first round left out as warm-up. The ratios printed are against the
first setting of the same invocation (the machines are noisy: compare within one run only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OPTIONS = ["--config", "fedavg", "--server-rounds", "4", "--server-batch", "8", "--eval-freq", "100"]


def run(procs: int, threads: int, options: list[str], out: Path, name: str) -> float:
    """Client updates per second of one run with `procs` processes of `threads` threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = (
        [sys.executable]
        if procs == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    )
    proc = subprocess.run(
        [*launcher, str(ROOT / "train_lora.py"), *options, "--dir", str(out), "--name", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"error: the run with {procs} process(es) failed:\n{proc.stderr[-2000:]}")
    rounds = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()][1:]
    if not rounds:
        sys.exit("error: the bench needs at least 2 rounds (the first is warm-up)")
    server_batch = yaml.safe_load((out / name / "config.yaml").read_text())["server_batch"]
    return server_batch * len(rounds) / sum(r["train_seconds"] for r in rounds)


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="processes sharing the one GPU instead of CPU threads")
    parser.add_argument(
        "--max-procs",
        type=int,
        default=None,
        help="GPU: up to this many processes (default 4); CPU: the thread budget (default: cores)",
    )
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    options = [*DEFAULT_OPTIONS, *extra, "--gpu", "auto" if args.gpu else "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.gpu:
            settings = [(p, 1) for p in range(1, (args.max_procs or 4) + 1)]
        else:
            budget = args.max_procs or os.cpu_count() or 2
            settings = [(1, budget), (budget, 1)]
        rates = []
        for procs, threads in settings:
            rates.append(run(procs, threads, options, out, f"p{procs}t{threads}"))
            print(
                f"{procs} process(es) x {threads} thread(s): {rates[-1]:.3f} client updates/s, "
                f"ratio {rates[-1] / rates[0]:.3f} vs the first",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
