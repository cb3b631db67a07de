"""Writing files so that a full disk, a read-only file system or a missing permission never leaves
a half-written file over a good one, and always says which file and why.

Every file a run or a study writes whole (checkpoints, summaries, configs, tables, the data cache,
the adapter) goes through `write_atomic`: the bytes go to a temporary file beside the target,
flushed to disk, then renamed over it; on any error the temporary file is removed and the target
is as it was. Files written bit by bit (metrics.jsonl, train.log, TensorBoard events,
client_state.bin) are appended to or written at slots no checkpoint refers to, and their write
errors are given the file's name (`naming`). Whoever stops on a WriteFailed says its line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class WriteFailed(Exception):
    """A file that could not be written: `path` and the operating system's reason."""

    def __init__(self, path, reason: str, errno: int | None = None, then: str = ""):
        """then: what follows from it (what is kept, what to do), said after the reason."""
        said = f"cannot write {path} ({reason})" if path is not None else f"a write failed ({reason})"
        super().__init__(said + (f"; {then}" if then else ""))
        self.path, self.reason, self.errno = None if path is None else Path(path), reason, errno


def reason_of(e: BaseException) -> str:
    """The operating system's words for an error (No space left on device...), else its first line."""
    if isinstance(e, WriteFailed):
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def failed(e: OSError, path=None) -> WriteFailed:
    name = path if e.filename is None else os.fsdecode(e.filename)  # some libraries name files in bytes
    return WriteFailed(name, reason_of(e), e.errno)


@contextlib.contextmanager
def naming(path):
    """OSErrors inside become WriteFailed naming `path` (or the file the error itself names)."""
    try:
        yield
    except OSError as e:
        raise failed(e, path) from None


def write_atomic(path, data: bytes | str) -> None:
    """path holds exactly `data`, or (on any error: WriteFailed) what it held before."""
    import tempfile

    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    tmp = None
    try:  # a name of its own: processes writing one file at once (ranks, a study's runs) never share one
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # as open() would have made it (mkstemp makes it private)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise failed(e, path) from None


def replace_folder(folder: Path, fill) -> None:
    """folder holds exactly what fill(tmp) writes into an empty temporary folder, or (on any error,
    raised as WriteFailed) what it held before. fill may raise other errors of the libraries that
    write (safetensors, torch); they are reported with the folder's name."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    try:
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except (OSError, RuntimeError, *_library_write_errors()) as e:  # torch's RuntimeError, SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        raise WriteFailed(getattr(e, "filename", None) or folder, reason_of(e), getattr(e, "errno", None)) from None
    shutil.rmtree(old, ignore_errors=True)


def _library_write_errors() -> tuple:
    try:
        from safetensors import SafetensorError

        return (SafetensorError,)
    except ImportError:
        return ()


def writable(folder: Path) -> OSError | None:
    """None if a file can be made in `folder`, else the error (made and removed at once: a real
    probe, since permission bits alone do not tell a read-only mount or root's rights)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".flasc-probe-")
    except OSError as e:
        return e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None
