"""Every aggregation strategy and server optimizer on the embedded default, one table.

    python bench/strategy_table.py                       # all method configs, 10 rounds each
    python bench/strategy_table.py --rounds 16 --configs fedavg,fisher,regmean
    python bench/strategy_table.py --set client_lr=0.1   # an override applied to every run

Runs the configs one after another with the same seed and rounds (runs land in
runs/strategy_table/), then prints a markdown table: final test accuracy, seconds per training
round (client training + merge statistics + aggregation; evaluation excluded), the share of it spent
on client-side merge statistics (Fisher / Gram), and the megabytes sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config as config_mod  # noqa: E402
import train_lora  # noqa: E402

CONFIGS = [
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedadagrad",
    "fedyogi",
    "fedprox",
    "task_arithmetic",
    "ties",
    "ties_product",
    "dare",
    "dare_ties",
    "dare_ties_product",
    "magnitude_prune",
    "fisher",
    "regmean",
    "regmean_product",
    "average_product",
]


def row(name: str, run_dir: Path) -> dict:
    cfg = config_mod.from_mapping(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(m["train_seconds"] for m in metrics) / len(metrics)
    stats_s = sum(m["stats_seconds"] for m in metrics) / len(metrics)
    return {
        "config": name,
        "strategy": cfg.merging_strategy,
        "space": cfg.merge_space,
        "server_opt": f"{cfg.server_opt} (lr {cfg.server_lr:g})",
        "acc": summary["test_accuracy"],
        "best": summary["best_test_accuracy"],
        "s_round": train_s,
        "stats_s": stats_s,
        "mb": summary["bytes_total"] / 1e6,
    }


def table(rows: list[dict]) -> str:
    base = next((r["s_round"] for r in rows if r["config"] == "fedavg"), None)
    lines = [
        "| config | strategy | space | server optimizer | test acc | best test acc | s / round "
        "| vs fedavg | of which statistics | MB sent |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{r['s_round'] / base:.2f}" if base else "-"
        lines.append(
            f"| `{r['config']}` | {r['strategy']} | {r['space']} | {r['server_opt']} | {r['acc']:.4f} "
            f"| {r['best']:.4f} | {r['s_round']:.1f} | {rel} | {r['stats_s']:.1f} | {r['mb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dir", default="runs/strategy_table")
    args = ap.parse_args()
    from loguru import logger

    logger.remove()  # one line per run here; each run's full log is in its folder
    overrides = [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
    rows = []
    for name in args.configs.split(","):
        cfg = train_lora.parse_cli(
            [
                "--config",
                name,
                "--server-rounds",
                str(args.rounds),
                "--eval-freq",
                str(args.rounds),
                "--dir",
                args.dir,
                "--name",
                name,
                *overrides,
            ]
        )
        run_dir = train_lora.train(cfg)
        rows.append(row(name, run_dir))
        print(f"{name}: test accuracy {rows[-1]['acc']:.4f}, {rows[-1]['s_round']:.1f} s/round", flush=True)
    text = table(rows)
    print(text)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    (Path(args.dir) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
