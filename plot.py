"""Figures of finished runs: accuracy per round, per megabyte sent and per second, final accuracy
per run, and where the runs logged them, the merging diagnostics: shadow gains per strategy and
client drift per round.

    python plot.py runs/study/*            # figures in runs/study/plots/ (PNG and PDF)
    python plot.py RUN_DIR... --out figs --ema 0.6

Runs that differ only by seed are drawn as one curve: the mean, with a band from the lowest to the
highest seed; bars show the mean and the seeds' standard deviation. --ema A smooths the accuracy
curves (each point A · the previous smoothed point + (1 − A) · its own value; 0: off).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import config as config_mod
from flasc.runtime import tracking
from flasc.runtime.tracking import config_name_of


class PlotError(ValueError):
    pass


def load_run(folder: Path) -> dict:
    if not folder.is_dir():
        raise PlotError(f"{folder} is not a run folder")
    if not (folder / "metrics.jsonl").is_file() or not (folder / "config.yaml").is_file():
        raise PlotError(f"{folder} holds no run (no metrics.jsonl / config.yaml)")
    if not (folder / "summary.json").is_file():
        raise PlotError(
            f"{folder} is unfinished (no summary.json); resume it with python train_lora.py --resume {folder}"
        )
    metrics = tracking.read_jsonl(folder / "metrics.jsonl")
    summary = tracking.read_json(folder / "summary.json")
    metric = summary.get("primary_metric", "accuracy")
    evals = [m for m in metrics if f"test_{metric}" in m]
    if not evals:
        raise PlotError(f"{folder} has no evaluated round")
    elapsed, total = {}, 0.0
    for m in metrics:  # seconds of training and evaluation until the end of each round
        total += m.get("seconds", 0.0)
        elapsed[m["round"]] = total
    for e in evals:
        e.setdefault("elapsed_seconds", elapsed[e["round"]])
    return {
        "dir": folder,
        "config": config_mod.yaml_load(config_mod.read_text(folder / "config.yaml", "the run's saved config")),
        "config_name": config_name_of(folder),
        "summary": summary,
        "evals": evals,
        "metrics": metrics,
        "metric": metric,
    }


def group_key(run: dict) -> str:
    """A label from the options that distinguish the runs (seed, dir, name excluded)."""
    return run["label"]


def label_runs(runs: list[dict]) -> None:
    """Each run's label: the config it came from and every option it changed on top of that config
    (seed, dir and name aside), so runs that differ only by seed share a label."""
    for r in runs:
        name = r["config_name"]
        try:
            base = config_mod.load_config(name, {"dataset": r["config"]["dataset"]})
        except config_mod.ConfigError:  # a config file that has moved since: compare with the defaults
            base = config_mod.load_config()
        changed = [
            f"{k}={v}"
            for k, v in r["config"].items()
            if k not in ("seed", "dir", "name", "dataset") and base.get(k) != v
        ]
        if r["config"]["dataset"] != config_mod.load_config().dataset:
            changed.insert(0, f"dataset={r['config']['dataset']}")
        title = name or "defaults"
        r["label"] = f"{title} ({', '.join(changed)})" if changed else title


def _groups(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(group_key(r), []).append(r)
    return out


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average: s_0 = v_0, s_t = alpha · s_(t−1) + (1 − alpha) · v_t."""
    out = []
    for v in values:
        out.append(v if not out else alpha * out[-1] + (1 - alpha) * v)
    return out


def _curve(ax, runs: list[dict], x_of, label: str, smoothing: float = 0.0) -> None:
    xs = [x_of(e) for e in runs[0]["evals"]]
    ys = [ema([e[f"test_{r['metric']}"] for e in r["evals"]], smoothing) for r in runs]
    n = min(len(y) for y in ys)
    mean = [statistics.fmean(y[i] for y in ys) for i in range(n)]
    (line,) = ax.plot(xs[:n], mean, marker="o", ms=3, label=label + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
    if len(runs) > 1:
        ax.fill_between(
            xs[:n],
            [min(y[i] for y in ys) for i in range(n)],
            [max(y[i] for y in ys) for i in range(n)],
            color=line.get_color(),
            alpha=0.2,
        )


def _band(ax, runs: list[dict], key: str, label: str) -> bool:
    """Mean over the runs of metric `key` per round, with a min–max band; False if no run logged it."""
    series = [{m["round"]: m[key] for m in r["metrics"] if isinstance(m.get(key), (int, float))} for r in runs]
    rounds = sorted(set.intersection(*(set(s) for s in series))) if all(series) else []
    if not rounds:
        return False
    values = [[s[x] for s in series] for x in rounds]
    (line,) = ax.plot(rounds, [statistics.fmean(v) for v in values], marker="o", ms=2, label=label)
    if len(runs) > 1:
        ax.fill_between(rounds, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    return True


def distinguishing_titles(groups: dict[str, list[dict]]) -> dict[str, str]:
    """Each group's title: only the options whose values differ between the groups (the full label
    when nothing does)."""
    configs = {label: members[0]["config"] for label, members in groups.items()}
    keys = sorted({k for c in configs.values() for k in c} - {"seed", "name", "dir"})
    varying = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
    return {
        label: ", ".join(f"{k}={c.get(k)}" for k, c in [(k, configs[label]) for k in varying]) or label
        for label in groups
    }


DRIFT_PANELS = [
    ("drift_cosine_mean", "mean pairwise cosine"),
    ("drift_distance_mean", "distance from the mean update"),
    ("drift_sign_conflict", "sign conflict (factors)"),
    ("drift_sign_conflict_product", "sign conflict (product ΔW)"),
    ("drift_effective_rank", "effective rank of the updates"),
    ("drift_norm_cv", "update norm spread (CV)"),
]


def shadow_names(runs: list[dict]) -> list[str]:
    names = {
        k[len("shadow_") : -len("_gain")]
        for r in runs
        for m in r["metrics"]
        for k in m
        if k.startswith("shadow_") and k.endswith("_gain")
    }
    return sorted(names)


def plot(runs: list[dict], out: Path, smoothing: float = 0.0) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label_runs(runs)
    groups = _groups(runs)
    metrics = sorted({r["metric"] for r in runs})  # each run's primary metric, accuracy for most tasks
    metric_name = metrics[0] if len(metrics) == 1 else "score (" + " / ".join(metrics) + ")"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, stem):
        for ext in ("png", "pdf"):
            path = out / f"{stem}.{ext}"
            fig.savefig(path, bbox_inches="tight", dpi=150)
            written.append(path)
        plt.close(fig)

    for stem, x_of, xlabel in (
        ("accuracy_vs_round", lambda e: e["round"], "round"),
        (
            "accuracy_vs_megabytes",
            lambda e: (e["bytes_up_total"] + e["bytes_down_total"]) / 1e6,
            "megabytes communicated (up + down)",
        ),
        ("accuracy_vs_seconds", lambda e: e["elapsed_seconds"], "seconds (training and evaluation)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in groups.items():
            _curve(ax, members, x_of, label, smoothing)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric_name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, stem)

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) + 2), 4.5))
    labels = list(groups)
    finals = [[r["summary"][f"test_{r['metric']}"] for r in groups[k]] for k in labels]
    means = [statistics.fmean(f) for f in finals]
    errs = [statistics.stdev(f) if len(f) > 1 else 0.0 for f in finals]
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"final test {metric_name}")
    lo = min(m - e for m, e in zip(means, errs))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m + e for m, e in zip(means, errs)) + 0.02))
    ax.grid(axis="y", alpha=0.3)
    save(fig, "final_accuracy")

    names = shadow_names(runs)
    if names:  # one panel per group of runs: each shadow strategy's one-round gain over the run's own
        titles = distinguishing_titles(groups)
        cols = min(3, len(groups))
        rows = -(-len(groups) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False, sharey=True)
        for ax, (label, members) in zip(axes.flat, groups.items()):
            for name in names:
                _band(ax, members, f"shadow_{name}_gain", name)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(titles[label], fontsize=8)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(groups) :]:
            ax.set_visible(False)
        for row in axes:
            row[0].set_ylabel(f"shadow gain, validation {metric_name}")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        save(fig, "shadow_gain_vs_round")

    panels = [(k, t) for k, t in DRIFT_PANELS if any(k in m for r in runs for m in r["metrics"])]
    if panels:  # one panel per statistic, one curve per group of runs
        titles = distinguishing_titles(groups)
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            for label, members in groups.items():
                _band(ax, members, key, titles[label])
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=6)
        save(fig, "drift_vs_round")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run folders")
    ap.add_argument("--out", help="output folder (default: plots/ beside the first run)")
    ap.add_argument("--ema", type=float, default=0.0, help="smooth accuracy curves, 0 <= A < 1 (default 0: off)")
    args = ap.parse_args(argv)
    try:
        if not args.runs:
            raise PlotError("no run folders given")
        folders = [Path(p) for p in args.runs if Path(p).name not in ("logs", "plots") and not Path(p).is_file()]
        if not folders:
            raise PlotError("no run folders among the arguments")
        runs = [load_run(f) for f in folders]
    except (PlotError, config_mod.ConfigError) as e:  # DamagedRecord, an unreadable config.yaml
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.ema < 1:
        print(f"error: --ema: {args.ema} is out of range; expected a number in [0, 1)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else folders[0].parent / "plots"
    for path in plot(runs, out, args.ema):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
