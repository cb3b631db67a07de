"""Run a study: a list of configs with overrides, grids and seeds, then one results table.

    python run_experiments.py --config-list experiments.yaml --jobs 2
    python run_experiments.py --config-list experiments.yaml --dry-run

experiments.yaml:

    dir: runs/study            # where the runs go (default runs/experiments)
    seeds: [0, 1]              # default seed axis for every entry
    defaults:                  # overrides applied to every entry
      server_rounds: 10
    experiments:
      - config: fedavg         # configs/NAME.yaml
        overrides:             # a list value is a grid axis (cartesian product); for an option
                               # that takes a list (shadow_strategies), a list of lists is
          merging_strategy: [average, ties]
          merge_space: product
        seeds: [0, 1, 2]       # replaces the default seeds for this entry

Every run gets the folder DIR/<config>[-key=value...]-seed<s>. A folder that holds a finished run
(summary.json) with the same resolved config is skipped; an unfinished one with a checkpoint is
resumed; one failing run does not stop the others and is reported at the end with its log. The
study ends with results.md and results.csv in DIR: mean ± std over seeds of final and best test
accuracy, bytes, ε (when set) and wall time.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

import config as config_mod
from flasc.runtime import files, tracking
from flasc.runtime.interrupts import INTERRUPTS, Interrupted, ends_with_this_process
from flasc.runtime.tracking import check_writable
from flasc.studies import launchers as cluster
from flasc.studies import tables as study_tables
from flasc.studies.runs import ROOT, RunSpec, command, made_with, outcome_of, state_of  # noqa: F401  (rx.X)


class StudyError(ValueError):
    """A bad experiments file; the message names the entry and key."""


def _slug(value) -> str:
    text = str(value)
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)


def check_shape(study) -> None:
    """The file's structure, before any of its values is used."""
    if not isinstance(study, dict):
        raise StudyError(
            f"the experiments file must be a mapping with 'experiments:' (and optionally dir, seeds, "
            f"defaults); it holds a {type(study).__name__}"
        )
    if not isinstance(study.get("experiments"), list) or not study["experiments"]:
        raise StudyError("the experiments file needs a non-empty list under 'experiments'")
    unknown = set(study) - {"dir", "seeds", "defaults", "experiments"}
    if unknown:
        raise StudyError(f"unknown top-level key(s) {sorted(unknown)}; allowed: dir, seeds, defaults, experiments")
    if "dir" in study and (not isinstance(study["dir"], str) or not study["dir"]):
        raise StudyError(f"dir: {study['dir']!r} is not a folder path; expected text such as runs/study")
    if not isinstance(study.get("defaults") or {}, dict):
        raise StudyError("defaults: expected a mapping of option: value")
    for i, entry in enumerate(study["experiments"]):
        if not isinstance(entry, dict) or "config" not in entry:
            raise StudyError(f"experiments[{i}]: each entry needs 'config: NAME' (a mapping)")
        if not isinstance(entry.get("overrides") or {}, dict):
            raise StudyError(
                f"experiments[{i}]: overrides: expected a mapping of option: value (a list value "
                "inside it is a grid axis)"
            )


def is_axis(key: str, value) -> bool:
    """A grid axis: a list, except for options whose value is a list (shadow_strategies), where an
    axis is a list of lists."""
    if not isinstance(value, list):
        return False
    if key in config_mod.SCHEMA and config_mod.SCHEMA[key].kind is list:
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def expand(study: dict, out_dir: str) -> list[RunSpec]:
    """experiments.yaml -> one RunSpec per (entry, grid point, seed), validated."""
    check_shape(study)
    defaults = study.get("defaults") or {}
    default_seeds = study.get("seeds", [0])
    specs: list[RunSpec] = []
    for i, entry in enumerate(study["experiments"]):
        where = f"experiments[{i}]"
        if not isinstance(entry, dict) or "config" not in entry:
            raise StudyError(f"{where}: each entry needs 'config: NAME'")
        bad = set(entry) - {"config", "overrides", "seeds", "name", "paired_with"}
        if bad:
            raise StudyError(
                f"{where}: unknown key(s) {sorted(bad)}; allowed: config, overrides, seeds, name, paired_with"
            )
        config_name = str(entry["config"])
        if config_mod.is_config_path(config_name):  # the runs start in the project folder: make it absolute
            config_name = str(Path(config_name).expanduser().resolve())
        seeds = entry.get("seeds", default_seeds)
        seeds = seeds if isinstance(seeds, list) else [seeds]
        overrides = {**defaults, **(entry.get("overrides") or {})}
        for key in ("dir", "name", "seed"):
            if key in overrides:
                raise StudyError(f"{where}: '{key}' is set by the study itself, not in overrides")
        axes = {k: v for k, v in overrides.items() if is_axis(k, v)}
        fixed = {k: v for k, v in overrides.items() if not is_axis(k, v)}
        for point in itertools.product(*axes.values()) if axes else [()]:
            grid = dict(zip(axes, point))
            base = entry.get("name", Path(config_name).stem if config_mod.is_config_path(config_name) else config_name)
            group = "-".join([_slug(base)] + [f"{_slug(k)}={_slug(v)}" for k, v in grid.items()])
            for seed in seeds:
                name = f"{group}-seed{seed}"
                values = {**fixed, **grid, "seed": seed, "dir": out_dir, "name": name}
                try:
                    resolved = config_mod.load_config(config_name, values)
                except config_mod.ConfigError as e:
                    raise StudyError(f"{where} ({name}): {e}") from None
                specs.append(RunSpec(name, config_name, values, group, grid, dict(resolved), entry.get("paired_with")))
    groups = {s.group for s in specs}
    for i, entry in enumerate(study["experiments"]):
        if "paired_with" in entry and entry["paired_with"] not in groups:
            raise StudyError(
                f"experiments[{i}]: paired_with: {entry['paired_with']!r} is no group of this study; "
                f"expected one of {', '.join(sorted(groups))}"
            )
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise StudyError(f"two entries produce the same run name(s) {sorted(dupes)}; give one a 'name'")
    return specs


def worker_env(slot: int, jobs: int) -> dict:
    """One GPU per job when there are GPUs; otherwise the CPU threads split evenly."""
    env = dict(os.environ)
    gpus = _gpu_count()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    else:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def run_all(specs: list[RunSpec], out_dir: Path, jobs: int, launcher=None) -> dict[str, str]:
    """Runs what is not done, `jobs` at a time here, or as cluster jobs through `launcher`
    (flasc/studies/launchers.py); returns name -> outcome (ok / skipped / failed: ...)."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    queue = []
    for spec in specs:
        state = state_of(spec, out_dir)
        if state == "done":
            outcome[spec.name] = "skipped (finished)"
        elif state == "diverged":
            outcome[spec.name] = "skipped (diverged before)"
        elif state == "conflict":
            outcome[spec.name] = (
                f"failed: {out_dir / spec.name} holds a run with another config; move it away or change the study's dir"
            )
        else:
            if state == "fresh" and (out_dir / spec.name).exists():
                shutil.rmtree(out_dir / spec.name)
            queue.append((spec, state))
    if launcher is not None:
        try:
            outcome.update(launcher.run([spec for spec, _ in queue], out_dir))
        except Interrupted as e:
            for spec, _ in queue:
                outcome.setdefault(
                    spec.name,
                    "interrupted: its job may still be running; run the study again "
                    "once it has ended (finished runs are skipped, others resume)",
                )
            e.outcome = outcome
            raise
        return outcome
    running: list[tuple[RunSpec, subprocess.Popen, object, int]] = []
    try:
        _drain(queue, running, outcome, out_dir, logs, jobs)
    except Interrupted as e:  # stop the runs the same way: each checkpoints its last round and exits
        for _, proc, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(e.signum)
        for spec, proc, log, _ in running:
            proc.wait()
            log.close()
            if proc.returncode == 0 and (out_dir / spec.name / "summary.json").is_file():
                outcome[spec.name] = "ok"  # it had finished just before
                continue
            outcome[spec.name] = (
                f"interrupted: {out_dir / spec.name} resumes when the study is run again"
                if (out_dir / spec.name / "checkpoint.pt").is_file()
                else "interrupted before its first checkpoint: it starts again when the study is run again"
            )
        for spec, _ in queue:
            outcome[spec.name] = "not started"
        e.outcome = outcome
        raise
    return outcome


def _drain(queue: list, running: list, outcome: dict, out_dir: Path, logs: Path, jobs: int) -> None:
    """Start queued runs as slots free up, until every run has ended (updates outcome)."""
    free = list(range(jobs))
    while queue or running:
        while queue and free:
            spec, state = queue.pop(0)
            try:
                log = open(logs / f"{spec.name}.log", "a")
            except OSError as e:  # its log cannot be written (disk full): the run fails, the others go on
                outcome[spec.name] = f"failed: cannot write {logs / spec.name}.log ({files.reason_of(e)})"
                continue
            slot = free.pop(0)
            print(f"[{time.strftime('%H:%M:%S')}] {'resume' if state == 'resume' else 'start'} {spec.name}", flush=True)
            proc = subprocess.Popen(
                command(spec, state, out_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker_env(slot, jobs),
                cwd=ROOT,
                preexec_fn=ends_with_this_process(),  # ends with the study
            )
            running.append((spec, proc, log, slot))
        time.sleep(0.2)
        for item in list(running):
            spec, proc, log, slot = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            free.append(slot)
            outcome[spec.name] = outcome_of(spec, proc.returncode, out_dir)
            print(f"[{time.strftime('%H:%M:%S')}] {outcome[spec.name].split(':')[0]} {spec.name}", flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# options the table has a column of its own for, or that only place and number a run
_OWN_COLUMNS = {
    "dir",
    "name",
    "seed",
    "algorithm",
    "merging_strategy",
    "merge_space",
    "server_opt",
    "dl_density",
    "ul_density",
}


def options_off_default(resolved: dict) -> dict:
    """Every option whose value differs from the defaults (basic_config.yaml with the data set's
    own defaults), except those with a column of their own."""
    try:
        base = config_mod.load_config(overrides={"dataset": resolved["dataset"]})
    except config_mod.ConfigError:  # the data set's defaults alone do not validate (e.g. its model)
        base = config_mod.load_config()
    return {k: v for k, v in resolved.items() if k not in _OWN_COLUMNS and base.get(k) != v}


def results_table(specs: list[RunSpec], out_dir: Path) -> list[dict]:
    """One row per group (runs that differ only by seed), from the finished runs' summaries."""
    rows = []
    for group in dict.fromkeys(s.group for s in specs):
        members = [s for s in specs if s.group == group]
        summaries = [
            tracking.read_json(out_dir / s.name / "summary.json")
            for s in members
            if (out_dir / s.name / "summary.json").is_file()
        ]
        # a diverged run is a result (the setting is unstable), counted apart and kept out of the means
        diverged = sum(state_of(s, out_dir) == "diverged" for s in members)
        if not summaries and not diverged:
            continue
        first = members[0]
        r = first.resolved
        row = {
            "run": group,
            "config": first.config,
            "options": ", ".join(f"{k}={v}" for k, v in options_off_default(r).items()),
            "algorithm": r["algorithm"],
            "strategy": r["merging_strategy"],
            "space": r["merge_space"],
            "server_opt": r["server_opt"],
            "dl/ul density": f"{r['dl_density']:g}/{r['ul_density']:g}",
            "seeds": len(summaries),
            "diverged": diverged,
        }
        if not summaries:
            rows.append(row)
            continue
        # each task's primary metric (accuracy, or micro-F1 for multi-label tasks)
        metric = summaries[0].get("primary_metric", "accuracy")
        short = "acc" if metric == "accuracy" else metric
        for key, label in ((f"test_{metric}", f"test {short}"), (f"best_test_{metric}", f"best test {short}")):
            row[label] = _mean_std([s[key] for s in summaries])
        if all(f"personal_{metric}_mean" in s for s in summaries):  # eval_personalized
            row[f"personal {short}"] = _mean_std([s[f"personal_{metric}_mean"] for s in summaries])
            row[f"global {short} on local tests"] = _mean_std([s[f"personal_global_{metric}_mean"] for s in summaries])
        tiers = sorted(
            {k.split("_")[0] for s in summaries for k in s if k.startswith("tier") and k.endswith(f"_test_{metric}")}
        )
        for tier in tiers:
            if all(f"{tier}_test_{metric}" in s for s in summaries):
                row[f"{tier} test {short}"] = _mean_std([s[f"{tier}_test_{metric}"] for s in summaries])
        if all(f"val_{metric}_auc" in s for s in summaries):
            row["val auc"] = _mean_std([s[f"val_{metric}_auc"] for s in summaries])
        if all("target_accuracy" in s for s in summaries):  # mean over the seeds that reached it
            reached = [s["rounds_to_target"] for s in summaries if s["rounds_to_target"] is not None]
            row["rounds to target"] = (
                f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(summaries)} seeds)"
                if reached
                else f"never (0/{len(summaries)} seeds)"
            )
        row["MB"] = _mean_std([s["bytes_total"] / 1e6 for s in summaries])
        if all("epsilon" in s for s in summaries):
            row["epsilon"] = _mean_std([s["epsilon"] for s in summaries])
        row["wall s"] = _mean_std([s["wall_time_s"] for s in summaries])
        per_round = [_round_seconds(out_dir / m.name) for m in members if (out_dir / m.name / "summary.json").is_file()]
        if all(x is not None for x in per_round):
            row["s/round"] = _mean_std(per_round)
        rows.append(row)
    return rows


def _round_seconds(folder: Path) -> float | None:
    """Median seconds of a round's client work and aggregation (train_seconds; evaluation apart;
    the median, so that a moment of contention on a shared machine does not move it)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    seconds = [m.get("train_seconds") for m in tracking.read_jsonl(path)]
    seconds = [x for x in seconds if x is not None]
    return statistics.median(seconds) if seconds else None


def write_tables(rows: list[dict], out_dir: Path) -> str:
    scores = list(
        dict.fromkeys(
            k for r in rows for k in r if k.startswith(("test ", "best test ", "personal ", "global ", "tier"))
        )
    )
    order = lambda k: (k.startswith("best"), k.startswith("tier"), k.startswith(("personal", "global")))  # noqa: E731
    keys = [
        "run",
        "config",
        "options",
        "algorithm",
        "strategy",
        "space",
        "server_opt",
        "dl/ul density",
        "seeds",
        "diverged",
        *sorted(scores, key=order),
        "val auc",
        "rounds to target",
        "MB",
        "epsilon",
        "s/round",
        "wall s",
    ]
    keys = [k for k in keys if any(k in r for r in rows)]

    def fmt(value, digits):
        if isinstance(value, tuple):
            return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
        return str(value)

    digits = {**{k: 4 for k in scores}, "val auc": 4, "MB": 1, "epsilon": 2, "s/round": 2, "wall s": 0}
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "-"), digits.get(k, 0)) for k in keys) + " |")
    md = "\n".join(lines)
    files.write_atomic(out_dir / "results.md", md + "\n")
    f = io.StringIO(newline="")
    w = csv.writer(f)
    header = []
    for k in keys:
        header += [f"{k} mean", f"{k} std"] if any(isinstance(r.get(k), tuple) for r in rows) else [k]
    w.writerow(header)
    for r in rows:
        line = []
        for k in keys:
            v = r.get(k, "")
            if any(isinstance(x.get(k), tuple) for x in rows):
                line += list(v) if isinstance(v, tuple) else ["", ""]
            else:
                line.append(v)
        w.writerow(line)
    files.write_atomic(out_dir / "results.csv", f.getvalue())
    return md


def folder_state(folder: Path, args: list[str]) -> str:
    """For run.sh: done / resume when `folder` holds a finished / resumable run of exactly the
    config that train_lora.py's options `args` give, fresh otherwise."""
    name, rest = config_mod.split_config_arg(args)
    wanted = dict(config_mod.load_config(name, config_mod.parse_overrides(rest)))
    if not made_with(folder, wanted):
        return "fresh"
    if (folder / "summary.json").is_file():
        return "done"
    return "resume" if (folder / "checkpoint.pt").is_file() else "fresh"


def cluster_launcher(args, unknown: list[str]):
    """The cluster launcher the options ask for (None: local); further sbatch options come as
    --slurm-KEY VALUE. Everything checked here, before anything is submitted."""
    extra, rest = {}, list(unknown)
    while rest:
        key = rest.pop(0)
        if not key.startswith("--slurm-"):
            raise StudyError(f"unknown argument {key!r}; see --help")
        if args.launcher != "slurm":
            raise StudyError(f"{key}: sbatch options are for --launcher slurm")
        if not rest or rest[0].startswith("--"):
            raise StudyError(f"{key} needs a value (sbatch options pass as --slurm-KEY VALUE)")
        extra[key[len("--slurm-") :].replace("-", "_")] = rest.pop(0)
    for name in ("gpus_per_run", "cpus_per_run", "timeout_min", "array_parallelism"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus_per_run" else 1):
            raise StudyError(f"--{name.replace('_', '-')}: expected a number >= {0 if name == 'gpus_per_run' else 1}")
    if args.launcher == "local":
        used = [
            f"--{n.replace('_', '-')}"
            for n in ("slurm_partition", "array_parallelism", "ray_address")
            if getattr(args, n)
        ] + (["--slurm-local"] if args.slurm_local else [])
        if used:
            raise StudyError(f"{used[0]} is for a cluster launcher; expected --launcher slurm or ray")
        return None
    if args.launcher == "ray" and (args.slurm_partition or args.array_parallelism or args.slurm_local):
        raise StudyError("--slurm-* options are for --launcher slurm")
    return cluster.launcher_from_args(args, extra)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--state-of"]:  # run.sh's question: python run_experiments.py --state-of DIR -- OPTIONS
        try:
            print(folder_state(Path(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:]))
        except (IndexError, config_mod.ConfigError) as e:
            print(f"error: --state-of RUN_DIR -- OPTIONS: {e}", file=sys.stderr)
            return 2
        return 0
    ap = argparse.ArgumentParser(description="Run a study of flasc runs and tabulate it.", allow_abbrev=False)
    ap.add_argument("--config-list", required=True, help="the experiments YAML file")
    ap.add_argument("--jobs", type=int, default=0, help="runs at once (default: GPUs, or 1 on CPU)")
    ap.add_argument("--dry-run", action="store_true", help="print the expanded runs and stop")
    ap.add_argument("--dir", help="where runs go (overrides the file's dir)")
    cl = ap.add_argument_group("on a cluster (docs/studies.md; pip install -r requirements-cluster.txt)")
    cl.add_argument(
        "--launcher",
        choices=["local", "slurm", "ray"],
        default="local",
        help="local: processes here (--jobs at once); slurm: one submitit job per run; ray: one Ray task per run",
    )
    cl.add_argument(
        "--gpus-per-run", type=int, default=0, help="slurm/ray: GPUs per run (several: torchrun in the job)"
    )
    cl.add_argument("--cpus-per-run", type=int, default=2, help="slurm/ray: CPU cores per run")
    cl.add_argument(
        "--timeout-min",
        type=int,
        default=240,
        help="slurm: a job's time limit in minutes; a job that reaches it is requeued and resumes",
    )
    cl.add_argument("--slurm-partition", help="slurm: the partition")
    cl.add_argument("--array-parallelism", type=int, help="slurm: jobs of the study's array running at once")
    cl.add_argument(
        "--slurm-local",
        action="store_true",
        help="slurm: submitit's local executor, the jobs on this machine (to try the SLURM path)",
    )
    cl.add_argument("--ray-address", help="ray: the cluster's address (default: a Ray instance started here)")
    args, unknown = ap.parse_known_args(argv)
    try:
        path = Path(args.config_list)
        if not path.is_file():
            raise StudyError(f"--config-list: no file {path}")
        try:
            study = config_mod.yaml_load(config_mod.read_text(path, "an experiments file"))
        except yaml.YAMLError as e:
            raise StudyError(f"{path}: not valid YAML ({e})") from None
        check_shape(study)
        out_dir = Path(args.dir or study.get("dir", "runs/experiments"))
        specs = expand(study, str(out_dir))
        check_writable(str(out_dir))
        if args.jobs < 0:
            raise StudyError("--jobs: expected a number >= 1")
        launcher = cluster_launcher(args, unknown)
    except (StudyError, config_mod.ConfigError, cluster.ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = args.jobs or max(1, _gpu_count())
    if args.dry_run:
        for spec in specs:
            print(
                f"{state_of(spec, out_dir):8s} {spec.name}: --config {spec.config} "
                + " ".join(f"--{k} {shlex.quote(config_mod.yaml_value(v))}" for k, v in spec.overrides.items())
            )
        print(f"{len(specs)} runs" + ("" if launcher is None else f", {launcher.describe()}"))
        return 0
    if launcher is not None:
        try:
            launcher.check()
        except cluster.ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        with files.naming(out_dir):  # the study's folder and its logs' folder: a read-only disk is one line
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    except files.WriteFailed as e:
        print(f"error: {e}; run the same command again once it can be written", file=sys.stderr)
        return 4
    INTERRUPTS.install()
    try:
        outcome = run_all(specs, out_dir, jobs, launcher)
    except Interrupted as e:
        try:
            rows = results_table(specs, out_dir)
        except tracking.DamagedRecord as damaged:
            print(f"error: {damaged}", file=sys.stderr)
            rows = []
        if rows:
            try:
                print(write_tables(rows, out_dir))
            except files.WriteFailed as failed:
                print(f"error: {failed}", file=sys.stderr)
        stopped = sum(o.startswith("interrupted") for o in e.outcome.values())
        print(
            f"interrupted ({e}): {stopped} running run(s) stopped, {len(rows)} group(s) tabulated"
            f"{' in ' + str(out_dir / 'results.md') if rows else ''}; run the same command again to resume",
            file=sys.stderr,
        )
        return e.exit_code
    finally:
        INTERRUPTS.uninstall()
    try:
        rows = results_table(specs, out_dir)
        if not rows:  # no empty table: say why in one line
            print(
                f"error: all {len(specs)} runs failed, none finished; see their logs in {out_dir / 'logs'}",
                file=sys.stderr,
            )
            return 2
        md = write_tables(rows, out_dir)
        extra = [
            name
            for name, table in (
                ("shadows.md", study_tables.shadow_table(specs, out_dir)),
                ("drift.md", study_tables.drift_table(specs, out_dir)),
                ("paired.md", study_tables.paired_table(specs, out_dir)),
            )
            if table
        ]
    except tracking.DamagedRecord as e:  # a run's record damaged after it finished: no table from it
        print(f"error: {e}; rerun that run (delete its folder) or restore the file", file=sys.stderr)
        return 2
    except files.WriteFailed as e:
        print(f"error: {e}; the runs are kept, run the same command again to write the tables", file=sys.stderr)
        return 4
    print(md)
    failed = {n: o for n, o in outcome.items() if o.startswith("failed")}
    diverged = {n: o for n, o in outcome.items() if o.startswith("diverged")}
    print(
        f"\n{len(specs)} runs: {sum(o == 'ok' for o in outcome.values())} ran, "
        f"{sum(o.startswith('skipped') for o in outcome.values())} skipped, {len(diverged)} diverged, "
        f"{len(failed)} failed; tables in {out_dir}/results.md and results.csv" + "".join(f", {name}" for name in extra)
    )
    for name, why in {**diverged, **failed}.items():
        print(f"  {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
