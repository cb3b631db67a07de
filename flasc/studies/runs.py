"""What one run of a study is, wherever it runs: its spec, the state its folder is in, the
train_lora.py command that starts or resumes it, and its outcome.

run_experiments.py expands a study into RunSpecs and runs them here or through a cluster launcher
(launchers.py); both decide a run's fate with the functions below, so a run is treated the same on
a laptop, a SLURM node or a Ray worker.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from flasc.options import read_text, yaml_load, yaml_value
from flasc.runtime.tracking import DIVERGED_FILE, EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]  # the repository: train_lora.py and configs/
DIVERGED_EXIT = EXIT_CODE["diverged"]


@dataclass
class RunSpec:
    name: str
    config: str
    overrides: dict  # everything passed on the command line (seed included)
    group: str  # the name without the seed: runs that differ only by seed
    axes: dict = field(default_factory=dict)  # the grid values of this run, for the table
    resolved: dict = field(default_factory=dict)
    paired_with: str | None = None  # the group paired.md compares this one with (None: the study's first)


def made_with(folder: Path, resolved: dict) -> bool:
    """Whether the run in `folder` was made with this resolved config. Options added to flasc since
    the run was made take their defaults, as the run had them."""
    import config as config_mod  # the schema and its defaults (config.py imports nothing of studies)

    try:
        return dict(config_mod.from_mapping(yaml_load(read_text(folder / "config.yaml")))) == resolved
    except (OSError, config_mod.ConfigError):
        return False


def state_of(spec: RunSpec, out_dir: Path) -> str:
    """done | resume | fresh | diverged | conflict (a folder of that name from another config)."""
    folder = out_dir / spec.name
    if not folder.exists():
        return "fresh"
    if not (folder / "config.yaml").is_file():
        return "fresh"
    if not made_with(folder, spec.resolved):
        return "conflict"
    if (folder / "summary.json").is_file():
        return "done"
    if (folder / DIVERGED_FILE).is_file():
        return "diverged"
    if (folder / "checkpoint.pt").is_file():
        return "resume"
    return "fresh"  # died before its first checkpoint: nothing to keep


def command(spec: RunSpec, state: str, out_dir: Path, procs: int = 1) -> list[str]:
    """train_lora.py for this run (fresh or --resume); under torchrun with `procs` processes > 1."""
    launch = (
        [sys.executable, str(ROOT / "train_lora.py")]
        if procs <= 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(procs),
            str(ROOT / "train_lora.py"),
        ]
    )
    if state == "resume":
        return [*launch, "--resume", str(out_dir / spec.name)]
    args = [*launch, "--config", spec.config]
    for key, value in spec.overrides.items():
        args += [f"--{key}", yaml_value(value)]
    return args


def outcome_of(spec: RunSpec, returncode: int, out_dir: Path) -> str:
    """ok / diverged / failed, from a finished train_lora.py's exit status and its run folder."""
    log = out_dir / "logs" / f"{spec.name}.log"
    if returncode == 0 and (out_dir / spec.name / "summary.json").is_file():
        return "ok"
    if returncode == DIVERGED_EXIT and (out_dir / spec.name / DIVERGED_FILE).is_file():
        return f"diverged: see {log}"
    return f"failed (exit {returncode}): see {log}"
