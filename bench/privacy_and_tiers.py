"""The privacy-utility and system-heterogeneity tables of docs/privacy-and-heterogeneity.md, on the embedded default.

    python bench/privacy_and_tiers.py            # both tables (9 runs)
    python bench/privacy_and_tiers.py --only dp  # or --only tiers

Privacy: noise_multiplier in {0, 0.5, 1.0} x density (download = upload) in {1, 0.25}, with
100 clients, 20 a round, local batches of 4, l2_clip_norm 0.5, 12 rounds. Heterogeneity: 3 tiers (LoRA rank 16), syshet
rank vs rankl1 vs density, 12 rounds; accuracy of each tier's model and bytes per tier.
Runs land in runs/privacy_and_tiers/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_lora  # noqa: E402

DP_BASE = [
    "--clients",
    "100",
    "--server-batch",
    "20",
    "--client-batch",
    "4",
    "--l2-clip-norm",
    "0.5",
    "--server-rounds",
    "12",
    "--eval-freq",
    "12",
]
TIER_BASE = ["--tiers", "3", "--lora-rank", "16", "--lora-alpha", "16", "--server-rounds", "12", "--eval-freq", "12"]


def run(name: str, args: list[str], out: str) -> dict:
    cfg = train_lora.parse_cli(["--config", "fedavg", *args, "--dir", out, "--name", name])
    run_dir = train_lora.train(cfg)
    return json.loads((run_dir / "summary.json").read_text())


def dp_table(out: str) -> str:
    lines = [
        "| noise multiplier | density (down = up) | test accuracy | ε (δ = 1/100) | MB sent |",
        "|---|---|---|---|---|",
    ]
    for density in ("1.0", "0.25"):
        for sigma in ("0.0", "0.5", "1.0"):
            s = run(
                f"dp-s{sigma}-d{density}",
                DP_BASE + ["--noise-multiplier", sigma, "--dl-density", density, "--ul-density", density],
                out,
            )
            eps = f"{s['epsilon']:.2f}" if "epsilon" in s else "∞ (no noise)"
            lines.append(f"| {sigma} | {density} | {s['test_accuracy']:.4f} | {eps} | {s['bytes_total'] / 1e6:.1f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def tier_table(out: str) -> str:
    lines = [
        "| syshet | tier 0 acc | tier 1 acc | tier 2 acc | server (dense) acc "
        "| MB up tier 0 / 1 / 2 | MB down tier 0 / 1 / 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for syshet in ("rank", "rankl1", "density"):
        s = run(f"tiers-{syshet}", TIER_BASE + ["--syshet", syshet], out)
        acc = " | ".join(f"{s[f'tier{i}_test_accuracy']:.4f}" for i in range(3))
        up = " / ".join(f"{s[f'bytes_up_tier{i}'] / 1e6:.2f}" for i in range(3))
        down = " / ".join(f"{s[f'bytes_down_tier{i}'] / 1e6:.2f}" for i in range(3))
        lines.append(f"| {syshet} | {acc} | {s['test_accuracy']:.4f} | {up} | {down} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("dp", "tiers"))
    ap.add_argument("--dir", default="runs/privacy_and_tiers")
    args = ap.parse_args()
    from loguru import logger

    logger.remove()
    tables = []
    if args.only in (None, "dp"):
        tables.append(dp_table(args.dir))
    if args.only in (None, "tiers"):
        tables.append(tier_table(args.dir))
    text = "\n\n".join(tables)
    print(text)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    (Path(args.dir) / f"table-{args.only or 'all'}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
