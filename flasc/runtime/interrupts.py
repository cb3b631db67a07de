"""Ctrl-C (SIGINT) and SIGTERM as an exception the run can end on cleanly.

A signal raises Interrupted at once while clients train (abandoning local training loses nothing:
the server is still that of the last completed round), but waits inside `deferred()` sections,
which train_lora.py puts around everything from the server step to the round's checkpoint, so the
run never stops with the server of one round and the records of another.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signum]


class Interrupts:
    def __init__(self):
        self.depth = 0  # > 0: inside a deferred section
        self.pending: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        """Route SIGINT and SIGTERM here (main thread only; elsewhere signals stay as they were)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self.depth, self.pending = 0, None

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        """A signal arriving inside waits for the end of the section, then raises."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        self._raise_pending()

    @contextlib.contextmanager
    def allowed(self):
        """Inside a deferred section: a part that may be abandoned at once (local training)."""
        saved, self.depth = self.depth, 0
        self._raise_pending()
        try:
            yield
        finally:
            self.depth = saved

    def _raise_pending(self) -> None:
        if self.pending is not None and not self.depth:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


INTERRUPTS = Interrupts()


def end_with_parent(signum: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send this process `signum` when its parent dies (Linux's PR_SET_PDEATHSIG),
    so that a torchrun worker or a study's run whose launcher was SIGKILLed (by a scheduler or the
    OOM killer) does not go on training alone: SIGTERM is an interrupt, the run checkpoints its
    last round, releases its folder and stays resumable. parent: the pid expected as the parent
    (the study's, when called in a child before exec); if it is already gone, the signal is sent
    now. Safe between fork and exec once the parent has called libc(): it only calls prctl.
    Elsewhere than Linux: nothing (no such call)."""
    c = libc()
    if c is None:
        return
    expected = os.getppid() if parent is None else parent
    c.prctl(1, int(signum), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != expected:  # the parent died before the call above: it would never fire
        os.kill(os.getpid(), signum)


_LIBC: list = []


def libc():
    """The C library through ctypes (loaded once; None off Linux). A parent that starts children
    with end_with_parent as their preexec_fn calls it first, so that the child loads nothing."""
    if not sys.platform.startswith("linux"):
        return None
    if not _LIBC:
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def ends_with_this_process():
    """A preexec_fn for subprocess.Popen: the child gets SIGTERM when this process dies."""
    import functools

    libc()  # loaded here, in the parent: the child between fork and exec only calls prctl
    return functools.partial(end_with_parent, signal.SIGTERM, os.getpid())
