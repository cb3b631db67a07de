"""The run folder: config.yaml, metrics.jsonl, TensorBoard events, the log, summary.json.

Every run records its full resolved config and one JSON line per round, so any number in a
table can be traced back to the run that produced it. metrics.jsonl is synced to disk before each
checkpoint, which keeps its length and digest; a resume cuts it back to exactly that and refuses
a file that lost or changed lines, and every reader (plot.py, the study tables) refuses a
damaged file with one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import xxhash
from loguru import logger

from flasc import options as config_mod

# How train_lora.py ends (docs/troubleshooting.md), and the file a diverged run leaves in its folder.
EXIT_CODE = {"ok": 0, "failed": 1, "bad_input": 2, "diverged": 3}
DIVERGED_FILE = "diverged.json"


def check_writable(parent: str) -> None:
    """Refuse a runs folder that cannot be written (a file, a read-only folder; for a folder still to
    be made, its nearest existing ancestor), before any data or model is loaded."""
    probe = Path(parent).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise config_mod.ConfigError(
            f"dir: {probe} is a file, not a folder; expected a folder the runs can be written to"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise config_mod.ConfigError(f"dir: {probe} is not writable; expected a folder the runs can be written to")


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


LOCK_FILE = ".lock"
CONFIG_COMMENT = "# --config "  # config.yaml's first line: the config the run came from


def config_name_of(run_dir: Path) -> str | None:
    """The --config a run came from, as its config.yaml records it (None: the defaults)."""
    first = (Path(run_dir) / "config.yaml").read_text().split("\n", 1)[0]
    return first[len(CONFIG_COMMENT) :].strip() if first.startswith(CONFIG_COMMENT) else None


def lock_run_dir(folder: Path, what: str):
    """An exclusive lock on the run folder for as long as this process writes to it (the OS drops it
    when the process ends, even on SIGKILL), so that a second process (a --resume of a live run)
    cannot append to the same files. Returns the open lock file; `what` starts the refusal line."""
    import fcntl

    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip()
        handle.close()
        raise config_mod.ConfigError(
            f"{what}: {folder} is being written by a live process"
            f"{f' (pid {pid})' if pid else ''}; wait for it to end or stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class DamagedRecord(config_mod.ConfigError):
    """A run's record (metrics.jsonl, summary.json) that cannot be read as written; the message
    names the file and what is wrong."""


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, each a JSON object with its round; DamagedRecord otherwise."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedRecord(f"{path}: byte {e.start} is not UTF-8 text; the file is damaged") from None
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise DamagedRecord(
                f"{path}: line {number} is not a round's JSON record; the file is damaged (a lost or cut write)"
            )
        out.append(record)
    return out


def read_json(path: Path) -> dict:
    """A run's summary.json (or another JSON object it wrote); DamagedRecord if it is not one."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise DamagedRecord(f"{path}: not a JSON object; the file is damaged (a lost or cut write)")
    return value


def check_metrics(path: Path, offset: int, digest: int | None, rounds_done: int) -> bytes:
    """The first `offset` bytes of a resumed run's metrics.jsonl, which its checkpoint saw (and
    whose digest it kept): CheckpointError if they are missing or differ, so that a resume never
    continues a record with lost or damaged rounds."""
    from flasc.runtime.checkpoint import CheckpointError

    todo = "restore it from a copy of the run folder, or start the run again"
    if not path.is_file():
        if offset == 0:
            return b""
        raise CheckpointError(f"--resume: {path} is missing; its checkpoint saw {rounds_done} rounds in it; {todo}")
    with open(path, "rb") as f:
        head = f.read(offset)
    if len(head) < offset:
        raise CheckpointError(
            f"--resume: {path} ends before the rounds its checkpoint saw ({len(head)} of {offset} bytes: "
            f"lines are lost); {todo}"
        )
    if digest is not None and xxhash.xxh3_64_intdigest(head) != digest:
        raise CheckpointError(f"--resume: {path} is damaged (its rounds differ from those its checkpoint saw); {todo}")
    return head


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")  # strict JSON: no NaN or Infinity
    os.replace(tmp, path)


class RunLog:
    def __init__(
        self,
        cfg,
        console=None,
        existing: Path | None = None,
        metrics_offset: int = 0,
        metrics_digest: int | None = None,
        purge_step: int | None = None,
        lock=None,
        config_name: str | None = None,
    ):
        """A new run folder, or (existing) a resumed one, whose lock the caller holds: metrics.jsonl
        is cut back to what the checkpoint had seen and TensorBoard drops events from purge_step on,
        so the rounds redone after a crash are not recorded twice. config.yaml records the folder
        name actually used (NAME-1 when NAME was taken). metrics_digest: the checkpoint's digest of
        metrics.jsonl's first metrics_offset bytes (None: a checkpoint written before digests)."""
        self._digest = xxhash.xxh3_64()
        if existing is None:
            self.dir = unique_run_dir(cfg.dir, cfg.name)
            self._lock = lock_run_dir(self.dir, "dir")
            header = f"{CONFIG_COMMENT}{config_name}\n" if config_name else ""
            (self.dir / "config.yaml").write_text(
                header + config_mod.dump(config_mod.Config({**cfg, "name": self.dir.name}))
            )
        else:
            self.dir = Path(existing)
            self._lock = lock
            metrics = self.dir / "metrics.jsonl"
            rounds_done = (purge_step or 1) - 1
            self._digest.update(check_metrics(metrics, metrics_offset, metrics_digest, rounds_done))
            if metrics.exists():
                os.truncate(metrics, metrics_offset)
        self._sinks = [
            logger.add(self.dir / "train.log", level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss} | {level} | {message}")
        ]
        if console is not None:
            self._sinks.append(logger.add(console, level="INFO", format="{message}", colorize=False))
        self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)

    def metrics_offset(self) -> int:
        """The length of metrics.jsonl, synced to disk (a checkpoint is about to refer to it)."""
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        return self._metrics.tell()

    def metrics_digest(self) -> int:
        """The digest of every byte metrics.jsonl holds (the checkpoint keeps it)."""
        return self._digest.intdigest()

    def log_round(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        self._metrics.write(line)
        self._digest.update(line.encode())
        step = record["round"]
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)
            elif isinstance(value, dict) and not key.endswith("_by_client"):  # per layer: one curve each
                for sub, v in value.items():
                    self.tb.add_scalar(f"{key.replace('_', '/', 1)}/{sub}", v, step)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.dir / "summary.json", summary)

    def close(self) -> None:
        self._metrics.close()
        self.tb.close()
        for sink in self._sinks:
            logger.remove(sink)
        if self._lock is not None:
            self._lock.close()


class NoRunLog:
    """What ranks other than 0 have instead of a RunLog under torchrun: they write nothing."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    def metrics_offset(self) -> int:
        return 0

    def metrics_digest(self) -> None:
        return None

    def log_round(self, record: dict) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Screen:
    """What a run shows while it runs: the rounds' progress bar (the previous round's loss and
    accuracy kept on it while clients train) and a log line per evaluated round."""

    def __init__(self, shown: bool, ranks: bool, primary: str, logger):
        self.shown, self.primary, self.logger = shown, primary, logger
        self.whose = "rank 0's " if ranks else ""  # the bar shows rank 0's share of the clients
        self.bar, self.last = None, ""

    def rounds(self, done: int, total: int):
        from tqdm import tqdm

        self.bar = tqdm(
            range(done, total), desc="rounds", disable=not self.shown, file=sys.stderr, initial=done, total=total
        )
        return self.bar

    def on_client(self, rnd: int, k: int, n: int) -> None:
        """Before the k-th of the round's n clients (of this rank) trains."""
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{self.last}{', ' if self.last else ''}round {rnd + 1}: {self.whose}client {k}/{n}", refresh=True
            )

    def round_done(self, record: dict, evals: list, totals: dict) -> None:
        p = self.primary
        self.last = f"loss={record['train_loss']:.3f}, acc={record['train_accuracy']:.3f}" + (
            f", test={evals[-1][f'test_{p}']:.3f}" if evals else ""
        )
        self.bar.set_postfix_str(self.last)
        if f"test_{p}" in record:
            eps = (
                f", epsilon {record['epsilon']:.3f}"
                if record.get("epsilon") is not None
                else ", epsilon unbounded"
                if "epsilon" in record
                else ""
            )
            self.logger.info(
                f"round {record['round']}: train loss {record['train_loss']:.4f}, "
                f"val {p} {record[f'val_{p}']:.4f}, test {p} {record[f'test_{p}']:.4f}, "
                f"MB up/down {totals['bytes_up'] / 1e6:.2f}/{totals['bytes_down'] / 1e6:.2f}{eps}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def console_sink(message) -> None:
    """Log lines to stderr without breaking the tqdm bar."""
    from tqdm import tqdm

    tqdm.write(str(message).rstrip("\n"), file=sys.stderr)
