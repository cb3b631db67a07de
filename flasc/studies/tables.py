"""The merging-diagnostics tables of a study (run_experiments.py writes them beside results.md).

shadows.md, per group of runs that differ only by seed and per shadow strategy: the one-round gain
of the shadow over the run's own aggregate in validation score (shadow_NAME_gain), averaged over the
run's shadowed rounds, then mean ± sample std over the seeds; the same over the first and the second
half of the rounds (does the gain shrink as training goes on); and the share of (seed, round) pairs
where the shadow scored higher than the run.

drift.md, per group: each client-drift statistic (flasc/diagnostics/drift.py) averaged over the rounds, then
mean ± sample std over the seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from flasc.runtime import files, tracking

DRIFT_COLUMNS = [
    "drift_cosine_mean",
    "drift_distance_mean",
    "drift_sign_conflict",
    "drift_sign_conflict_product",
    "drift_effective_rank",
    "drift_norm_cv",
]


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return tracking.read_jsonl(path) if path.is_file() else []


def _mean_std(values: list[float], signed: bool = False) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{'+' if signed else ''}.4f} ± {std:.4f}"


def _groups(specs, out_dir: Path) -> dict[str, tuple[str, list[list[dict]]]]:
    """group -> (its grid values as text, the metrics of each finished seed)."""
    out = {}
    for spec in specs:
        if not (out_dir / spec.name / "summary.json").is_file():
            continue
        label = ", ".join(f"{k}={v}" for k, v in spec.axes.items()) or spec.group
        out.setdefault(spec.group, (label, []))[1].append(_metrics(out_dir / spec.name))
    return out


def shadow_names(runs: list[list[dict]]) -> list[str]:
    return sorted(
        {
            k[len("shadow_") : -len("_gain")]
            for run in runs
            for m in run
            for k in m
            if k.startswith("shadow_") and k.endswith("_gain")
        }
    )


def shadow_table(specs, out_dir: Path) -> str | None:
    groups = _groups(specs, out_dir)
    names = shadow_names([run for _, runs in groups.values() for run in runs])
    if not names:
        return None
    sections = []
    for title, part in (("all shadowed rounds", None), ("first half of the rounds", 0), ("second half", 1)):
        lines = [
            f"**Gain over the run's own aggregate, {title}** (validation; mean over rounds, "
            "then mean ± std over seeds)",
            "",
            "| setting | seeds | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 2),
        ]
        for label, runs in groups.values():
            cells = []
            for name in names:
                per_seed = []
                for run in runs:
                    gains = [(m["round"], m[f"shadow_{name}_gain"]) for m in run if f"shadow_{name}_gain" in m]
                    if part is not None:
                        half = max(m["round"] for m in run) / 2
                        gains = [g for g in gains if (g[0] > half) == bool(part)]
                    if gains:
                        per_seed.append(statistics.fmean(g for _, g in gains))
                cells.append(_mean_std(per_seed, signed=True))
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    lines = [
        "**Rounds where the shadow scored higher than the run's own aggregate** (share of seed × round)",
        "",
        "| setting | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for label, runs in groups.values():
        cells = []
        for name in names:
            gains = [m[f"shadow_{name}_gain"] for run in runs for m in run if f"shadow_{name}_gain" in m]
            cells.append(f"{sum(g > 0 for g in gains) / len(gains):.2f}" if gains else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
    md = "\n\n".join(sections) + "\n"
    files.write_atomic(out_dir / "shadows.md", md)
    return md


def drift_table(specs, out_dir: Path) -> str | None:
    groups = _groups(specs, out_dir)
    columns = [c for c in DRIFT_COLUMNS if any(c in m for _, runs in groups.values() for run in runs for m in run)]
    if not columns:
        return None
    lines = [
        "**Client drift** (mean over rounds, then mean ± std over seeds)",
        "",
        "| setting | seeds | " + " | ".join(c[len("drift_") :] for c in columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for label, runs in groups.values():
        cells = []
        for column in columns:
            per_seed = [
                statistics.fmean(m[column] for m in run if column in m) for run in runs if any(column in m for m in run)
            ]
            cells.append(_mean_std(per_seed))
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    files.write_atomic(out_dir / "drift.md", md)
    return md
