"""The run folder: config.yaml, metrics.jsonl, TensorBoard events, the log, summary.json.

Every run records its full resolved config and one JSON line per round, so any number in a
table can be traced back to the run that produced it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loguru import logger

import config as config_mod


def unique_run_dir(parent: str, name: str) -> Path:
    """DIR/NAME, or DIR/NAME-1, DIR/NAME-2... if taken; created here so two runs never share one."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    candidate, i = Path(parent) / name, 0
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            i += 1
            candidate = Path(parent) / f"{name}-{i}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class RunLog:
    def __init__(self, cfg, console=None, existing: Path | None = None, metrics_offset: int = 0,
                 purge_step: int | None = None):
        """A new run folder, or (existing) a resumed one: metrics.jsonl is cut back to what the
        checkpoint had seen and TensorBoard drops events from purge_step on, so the rounds redone
        after a crash are not recorded twice."""
        if existing is None:
            self.dir = unique_run_dir(cfg.dir, cfg.name)
            (self.dir / "config.yaml").write_text(config_mod.dump(cfg))
        else:
            self.dir = Path(existing)
            metrics = self.dir / "metrics.jsonl"
            if metrics.exists():
                os.truncate(metrics, metrics_offset)
        self._sinks = [logger.add(self.dir / "train.log", level="DEBUG",
                                  format="{time:YYYY-MM-DD HH:mm:ss} | {level} | {message}")]
        if console is not None:
            self._sinks.append(logger.add(console, level="INFO", format="{message}", colorize=False))
        self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)

    def metrics_offset(self) -> int:
        self._metrics.flush()
        return self._metrics.tell()

    def log_round(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        step = record["round"]
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.dir / "summary.json", summary)

    def close(self) -> None:
        self._metrics.close()
        self.tb.close()
        for sink in self._sinks:
            logger.remove(sink)


def console_sink(message) -> None:
    """Log lines to stderr without breaking the tqdm bar."""
    from tqdm import tqdm
    tqdm.write(str(message).rstrip("\n"), file=sys.stderr)
