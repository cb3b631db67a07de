"""The merging-diagnostics tables of a study (run_experiments.py writes them beside results.md).

shadows.md, per group of runs that differ only by seed and per shadow strategy: the one-round gain
of the shadow over the run's own aggregate in validation score (shadow_NAME_gain), averaged over the
run's shadowed rounds, then mean ± sample std over the seeds; the same over the first and the second
half of the rounds (does the gain shrink as training goes on); and the share of (seed, round) pairs
where the shadow scored higher than the run.

drift.md, per group: each client-drift statistic (flasc/diagnostics/drift.py) averaged over the rounds, then
mean ± sample std over the seeds.

paired.md, every group against the study's first (its reference, e.g. fedavg), seed by seed: a
seed gives every run of it the same partition and client samples, so the difference of two runs of
one seed is a paired observation. Per group, over the seeds both finished: the mean of the
differences in the final test score (and the personalised score where both have one) ± its
standard error (sample std / √n); a * where the mean exceeds two standard errors, which is what
docs/algorithms.md calls a finding.
"""

from __future__ import annotations

import math
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


def paired_table(specs, out_dir: Path) -> str | None:
    """paired.md: each group against its reference (the study's first group, or the entry's
    paired_with; a group paired with itself is a reference only), seed by seed, mean ± standard
    error of the differences in final test and personalised score; None when no group has one."""
    groups = list(dict.fromkeys(s.group for s in specs))
    summaries = {
        g: {
            s.resolved["seed"]: tracking.read_json(out_dir / s.name / "summary.json")
            for s in specs
            if s.group == g and (out_dir / s.name / "summary.json").is_file()
        }
        for g in groups
    }
    chosen = {s.group: s.paired_with for s in specs if s.paired_with}
    reference_of = {g: chosen.get(g, groups[0]) for g in groups}
    others = [g for g in groups if reference_of[g] != g and set(summaries[g]) & set(summaries[reference_of[g]])]
    if not others:
        return None
    first = next(iter(summaries[reference_of[others[0]]].values()))
    metric = first.get("primary_metric", "accuracy")
    short = "acc" if metric == "accuracy" else metric
    scores = [(f"test_{metric}", f"Δ test {short}"), (f"personal_{metric}_mean", f"Δ personal {short}")]
    scores = [(k, label) for k, label in scores if any(k in s for g in groups for s in summaries[g].values())]
    lines = [
        "**Paired differences** (per seed, the run minus its reference's run of that seed: the study's "
        "first group, or the entry's paired_with; mean ± standard error over the seeds; * beyond two "
        "standard errors)",
        "",
        "| run | vs | seeds | " + " | ".join(label for _, label in scores) + " |",
        "|" + "---|" * (len(scores) + 3),
    ]
    for group in others:
        reference = reference_of[group]
        seeds = sorted(set(summaries[group]) & set(summaries[reference]))
        cells = []
        for key, _ in scores:
            pairs = [(summaries[group][s].get(key), summaries[reference][s].get(key)) for s in seeds]
            if any(a is None or b is None for a, b in pairs):
                cells.append("-")
                continue
            diffs = [a - b for a, b in pairs]
            mean = statistics.fmean(diffs)
            if len(diffs) < 2:
                cells.append(f"{mean:+.4f} (one seed)")
                continue
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            cells.append(f"{mean:+.4f} ± {se:.4f}{' *' if abs(mean) > 2 * se else ''}")
        lines.append(f"| {group} | {reference} | {len(seeds)} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    files.write_atomic(out_dir / "paired.md", md)
    return md
