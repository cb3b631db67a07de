"""The run folder: config.yaml, metrics.jsonl, TensorBoard events, the log, summary.json.

Every run records its full resolved config and one JSON line per round, so any number in a
table can be traced back to the run that produced it. metrics.jsonl is synced to disk before each
checkpoint, which keeps its length and digest; a resume cuts it back to exactly that and refuses
a file that lost or changed lines, and every reader (plot.py, the study tables) refuses a
damaged file with one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import xxhash
from loguru import logger

from flasc import options as config_mod
from flasc.runtime import files

# How train_lora.py ends (docs/troubleshooting.md), and the file a diverged run leaves in its folder.
EXIT_CODE = {"ok": 0, "failed": 1, "bad_input": 2, "diverged": 3, "write_failed": 4}
DIVERGED_FILE = "diverged.json"


def check_writable(parent: str, what: str = "dir") -> None:
    """Refuse a runs folder that cannot be written (a file, a read-only folder or file system, a
    place such as /proc where nothing can be made; for a folder still to be made, its nearest
    existing ancestor), before any data or model is loaded."""
    probe = Path(parent).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise config_mod.ConfigError(
            f"{what}: {probe} is a file, not a folder; expected a folder the runs can be written to"
        )
    error = files.writable(probe)
    if error is not None:
        raise config_mod.ConfigError(
            f"{what}: {probe} is not writable ({files.reason_of(error)}); expected a folder the runs can be written to"
        )


def unique_run_dir(parent: str, name: str) -> Path:
    """DIR/NAME, or DIR/NAME-1, DIR/NAME-2... if taken; created here so two runs never share one."""
    with files.naming(parent):
        Path(parent).mkdir(parents=True, exist_ok=True)
    candidate, i = Path(parent) / name, 0
    while True:
        try:
            with files.naming(candidate):
                candidate.mkdir()
            return candidate
        except files.WriteFailed as e:
            if e.errno != errno.EEXIST:
                raise
            i += 1
            candidate = Path(parent) / f"{name}-{i}"


LOCK_FILE = ".lock"
CONFIG_COMMENT = "# --config "  # config.yaml's first line: the config the run came from


def config_name_of(run_dir: Path) -> str | None:
    """The --config a run came from, as its config.yaml records it (None: the defaults)."""
    first = config_mod.read_text(Path(run_dir) / "config.yaml", "the run's saved config").split("\n", 1)[0]
    return first[len(CONFIG_COMMENT) :].strip() if first.startswith(CONFIG_COMMENT) else None


def lock_run_dir(folder: Path, what: str):
    """An exclusive lock on the run folder for as long as this process writes to it (the OS drops it
    when the process ends, even on SIGKILL), so that a second process (a --resume of a live run)
    cannot append to the same files. Returns the open lock file; `what` starts the refusal line."""
    import fcntl

    with files.naming(folder / LOCK_FILE):
        handle = open(folder / LOCK_FILE, "a+b", buffering=0)  # unbuffered: nothing left to flush on close
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().decode(errors="replace").strip()
        handle.close()
        raise config_mod.ConfigError(
            f"{what}: {folder} is being written by a live process"
            f"{f' (pid {pid})' if pid else ''}; wait for it to end or stop it first"
        ) from None
    try:  # the pid only helps the refusal above say who holds it: a full disk does not stop the run here
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
    except OSError:
        pass
    return handle


def megabytes(n: int) -> str:
    """Bytes as the screen says them: MB, and past 1000 MB also GB (as FlowerTune reports them)."""
    return f"{n / 1e6:.2f} MB" + (f" ({n / 1e9:.2f} GB)" if n >= 1e9 else "")


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


def check_metrics(path: Path, offset: int, digest: int | None, rounds_done: int, redo: dict | None = None) -> bytes:
    """The first `offset` bytes of a resumed run's metrics.jsonl, which its checkpoint saw (and
    whose digest it kept): CheckpointError if they are missing or differ, so that a resume never
    continues a record with lost or damaged rounds. redo (a checkpoint of a run being continued
    to more rounds, see redo_plan): the file may already hold the redone version; it is returned."""
    from flasc.runtime.checkpoint import CheckpointError

    todo = "restore it from a copy of the run folder, or start the run again"
    if redo is not None and path.is_file():
        with open(path, "rb") as f:
            head = f.read(redo["offset"])
        if len(head) == redo["offset"] and xxhash.xxh3_64_intdigest(head) == redo["digest"]:
            return head
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


def redone(head: bytes, record: dict | None) -> bytes:
    """metrics.jsonl's bytes with the last line replaced by `record` (None: dropped)."""
    start = head.rstrip(b"\n").rfind(b"\n") + 1
    return head[:start] + (b"" if record is None else (json.dumps(record, allow_nan=False) + "\n").encode())


def write_json_atomic(path: Path, obj) -> None:
    files.write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")  # strict JSON: no NaN or Infinity


class LogFile:
    """train.log as loguru's sink: a write that fails (disk full) is raised naming the file,
    instead of loguru's "Logging error" block with the whole message."""

    def __init__(self, path: Path):
        self.path = path
        with files.naming(path):
            self._file = open(path, "a", encoding="utf-8")

    def write(self, message: str) -> None:
        with files.naming(self.path):
            self._file.write(message)
            self._file.flush()

    def close(self) -> None:
        with files.naming(self.path):
            self._file.close()


def quiet_event_writer_threads() -> None:
    """TensorBoard writes events from a thread of its own; a write that fails there (disk full) is
    raised again on the run's next TensorBoard call, which names the folder. Its thread's own
    traceback is therefore not printed."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "flasc_quiet", False):
        return

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.flasc_quiet = True
    threading.excepthook = hook


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
        metrics_redo: dict | None = None,
    ):
        """A new run folder, or (existing) a resumed one, whose lock the caller holds: metrics.jsonl
        is cut back to what the checkpoint had seen and TensorBoard drops events from purge_step on,
        so the rounds redone after a crash are not recorded twice. config.yaml records the folder
        name actually used (NAME-1 when NAME was taken). metrics_digest: the checkpoint's digest of
        metrics.jsonl's first metrics_offset bytes (None: a checkpoint written before digests);
        metrics_redo: the checkpoint's redo_plan, carried out now if the file does not hold it yet.
        A new folder that cannot be set up (disk full) is removed again: it never holds the name."""
        self._digest = xxhash.xxh3_64()
        self._sinks, self._log, self._metrics, self.tb, self._lock = [], None, None, None, lock
        self.dir = Path(existing) if existing is not None else unique_run_dir(cfg.dir, cfg.name)
        try:
            self._open(cfg, console, existing, metrics_offset, metrics_digest, purge_step, config_name, metrics_redo)
        except BaseException:
            self.close()
            if existing is None:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _open(self, cfg, console, existing, metrics_offset, metrics_digest, purge_step, config_name, redo) -> None:
        metrics = self.dir / "metrics.jsonl"
        if existing is None:
            self._lock = lock_run_dir(self.dir, "dir")
            header = f"{CONFIG_COMMENT}{config_name}\n" if config_name else ""
            files.write_atomic(
                self.dir / "config.yaml", header + config_mod.dump(config_mod.Config({**cfg, "name": self.dir.name}))
            )
        else:
            rounds_done = (purge_step or 1) - (0 if redo else 1)
            head = check_metrics(metrics, metrics_offset, metrics_digest, rounds_done, redo)
            if redo is not None and len(head) == metrics_offset and xxhash.xxh3_64_intdigest(head) != redo["digest"]:
                head = redone(head, redo["record"])
                files.write_atomic(metrics, head)  # the old version or the redone one, never half of either
            self._digest.update(head)
            if metrics.exists():
                with files.naming(metrics):
                    os.truncate(metrics, len(head))
        quiet_event_writer_threads()
        self._log = LogFile(self.dir / "train.log")
        fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level} | {message}"
        self._sinks.append(logger.add(self._log, level="DEBUG", format=fmt, catch=False))
        if console is not None:
            self._sinks.append(logger.add(console, level="INFO", format="{message}", colorize=False, catch=False))
        with files.naming(metrics):
            self._metrics = open(metrics, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        with files.naming(self.dir / "tb"):
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)
        if redo is not None and redo["record"] is not None:
            self._scalars(redo["record"])  # purged with its round (purge_step), logged again as redone

    def metrics_offset(self) -> int:
        """The length of metrics.jsonl, synced to disk with the TensorBoard events (a checkpoint is
        about to refer to it)."""
        with files.naming(self.dir / "metrics.jsonl"):
            self._metrics.flush()
            os.fsync(self._metrics.fileno())
        with files.naming(self.dir / "tb"):
            self.tb.flush()
        return self._metrics.tell()

    def metrics_digest(self) -> int:
        """The digest of every byte metrics.jsonl holds (the checkpoint keeps it)."""
        return self._digest.intdigest()

    def log_round(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with files.naming(self.dir / "metrics.jsonl"):
            self._metrics.write(line)
        self._digest.update(line.encode())
        self._scalars(record)

    def _scalars(self, record: dict) -> None:
        step = record["round"]
        with files.naming(self.dir / "tb"):
            for key, value in record.items():
                if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key.replace("_", "/", 1), value, step)
                elif isinstance(value, dict) and not key.endswith("_by_client"):  # per layer: one curve each
                    for sub, v in value.items():
                        self.tb.add_scalar(f"{key.replace('_', '/', 1)}/{sub}", v, step)

    def redo_plan(self, record: dict | None) -> dict:
        """What replacing metrics.jsonl's last line by `record` (None: dropping it) makes of the file:
        its length and digest, which the checkpoint saved before the change keeps (with the
        record), so that a resume accepts the file before or after the change and finishes it."""
        with files.naming(self.dir / "metrics.jsonl"):
            self._metrics.flush()
            new = redone((self.dir / "metrics.jsonl").read_bytes(), record)
        return {"record": record, "offset": len(new), "digest": xxhash.xxh3_64_intdigest(new)}

    def apply_redo(self, redo: dict) -> None:
        """Carry out a redo_plan (TensorBoard was opened with purge_step at its round)."""
        path = self.dir / "metrics.jsonl"
        with files.naming(path):
            new = redone(path.read_bytes(), redo["record"])
            files.write_atomic(path, new)  # the old version or the new one, never half of either
            self._metrics.close()
            self._metrics = open(path, "a", buffering=1)
        self._digest = xxhash.xxh3_64(new)
        if redo["record"] is not None:
            self._scalars(redo["record"])

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.dir / "summary.json", summary)

    def close(self) -> files.WriteFailed | None:
        """Close every file and release the lock, whatever fails; returns the first write that
        failed on the way (the caller decides whether it matters), never raises it."""
        first = None
        parts = [
            (self._metrics and self._metrics.close, self.dir / "metrics.jsonl"),
            (self.tb and self.tb.close, self.dir / "tb"),
        ]
        for close, path in parts:
            try:
                if close:
                    close()
            except Exception as e:  # noqa: BLE001 - a full disk at the last flush: reported by the caller
                first = first or files.WriteFailed(path, files.reason_of(e))
        for sink in self._sinks:
            logger.remove(sink)
        self._sinks = []
        if self._log is not None:
            try:
                self._log.close()
            except files.WriteFailed as e:
                first = first or e
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
        self._metrics = self.tb = self._log = self._lock = None
        return first


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

    def redo_plan(self, record: dict | None) -> None:
        return None

    def apply_redo(self, redo) -> None:
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
                f"MB up/down {totals['bytes_up'] / 1e6:.2f}/{totals['bytes_down'] / 1e6:.2f}"
                + (
                    f" (GB {totals['bytes_up'] / 1e9:.2f}/{totals['bytes_down'] / 1e9:.2f})"
                    if totals["bytes_up"] >= 1e9
                    else ""
                )
                + eps
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def console_sink(message) -> None:
    """Log lines to stderr without breaking the tqdm bar."""
    from tqdm import tqdm

    tqdm.write(str(message).rstrip("\n"), file=sys.stderr)
