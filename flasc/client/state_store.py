"""Per-client state that persists across rounds (FedSA-LoRA's local B, SCAFFOLD's control variate),
kept in one file so that memory does not grow with the number of clients; docs/algorithms.md
("Client state") says what users see of it and measures it.

How it stays exact under a kill: every client has two slots in `client_state.bin`, read and
written with pread/pwrite (through the page cache, never held in this process). A new state always
goes to the slot the last checkpoint does *not* refer to, so the states a checkpoint refers to are
never overwritten until the next checkpoint is safely on disk (`flush` before the checkpoint is
written, `committed` after). In memory there is one byte per client saying which slot is current.
Small per-client facts (a HetLoRA client's pruned rank) are arrays held by the algorithm and saved
in the checkpoint itself.

How damage is caught: every slot's XXH3-64 digest is taken as it is written, kept in memory beside
the slot byte and saved in the checkpoint for the current slots; every read is checked against it
(torchrun: by rank 0, before it sends a state). A flipped byte, a truncated or deleted file, or an
older copy of the file put back stops the run with ClientStateDamaged instead of training on wrong
states. The digest costs a few percent of a state's read or write (bench/client_state.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import xxhash

from flasc.runtime import files
from flasc.runtime.checkpoint import CheckpointError

FILE = "client_state.bin"
VALUE = np.dtype("<f4")
WHAT_TO_DO = "resume from an earlier copy of the run folder, or start the run again"


class ClientStateDamaged(CheckpointError):
    """A stored client state that cannot be trusted; the message names the client and the file."""


def digest(buffer) -> int:
    return xxhash.xxh3_64_intdigest(buffer)


class ClientStateStore:
    def __init__(self, folder: Path | None, clients: int, numel: int):
        """folder: where client_state.bin goes (None: a private temporary file, removed on close)."""
        self.clients, self.numel = clients, numel
        self.slot_bytes = numel * VALUE.itemsize
        if folder is None:
            fd, name = tempfile.mkstemp(prefix="flasc_client_state_")
            os.unlink(name)  # anonymous: gone when closed or when the process dies
            self.fd, self.path, self.existed = fd, Path(name), True
        else:
            self.path = Path(folder) / FILE
            self.existed = self.path.exists()
            with files.naming(self.path):
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.current = np.full(clients, -1, dtype=np.int8)  # slot holding each client's state, -1: none yet
        self.saved = np.full(clients, -1, dtype=np.int8)  # slot the last checkpoint refers to
        self.digests = np.zeros((clients, 2), dtype=np.uint64)  # each slot's digest, as written
        self.checked = np.zeros((clients, 2), dtype=bool)  # False: a slot of a checkpoint saved without digests

    def __len__(self) -> int:
        """Clients that have a state."""
        return int((self.current >= 0).sum())

    def has(self, client: int) -> bool:
        return bool(self.current[client] >= 0)

    def _offset(self, client: int, slot: int) -> int:
        return (2 * client + slot) * self.slot_bytes

    def get(self, client: int) -> torch.Tensor | None:
        """The client's state (a new CPU tensor), or None if it never had one."""
        slot = int(self.current[client])
        if slot < 0:
            return None
        values = np.empty(self.numel, dtype=VALUE)
        got = os.preadv(self.fd, [values], self._offset(client, slot))  # straight into the tensor's memory
        if got != self.slot_bytes:
            raise self.damaged(client, "is cut short (the file is truncated)")
        if self.checked[client, slot] and digest(values) != int(self.digests[client, slot]):
            raise self.damaged(client, "does not match the checksum written with it")
        return torch.from_numpy(values)

    def damaged(self, client: int, what: str) -> ClientStateDamaged:
        return ClientStateDamaged(
            f"{self.path}: client {client}'s stored state {what}; the run stops with its last checkpoint "
            f"kept: {WHAT_TO_DO}"
        )

    def put(self, client: int, state: torch.Tensor) -> None:
        """Store the client's new state, in the slot the last checkpoint does not refer to."""
        values = state.detach().to("cpu", torch.float32).reshape(-1)
        if values.numel() != self.numel:
            raise ValueError(f"client state of {values.numel()} values; the store holds {self.numel}")
        slot = 1 if self.saved[client] == 0 else 0
        data = np.ascontiguousarray(values.numpy(), dtype=VALUE)
        with files.naming(self.path):  # a full disk: the slot is one no checkpoint refers to
            written = os.pwrite(self.fd, data, self._offset(client, slot))  # from the array's memory, no copy
        if written != self.slot_bytes:
            raise files.WriteFailed(self.path, f"short write of client {client}'s state")
        self.digests[client, slot], self.checked[client, slot] = digest(data), True
        self.current[client] = slot

    def flush(self) -> None:
        """Every state written so far is on disk (called before a checkpoint refers to them)."""
        with files.naming(self.path):
            os.fsync(self.fd)

    def state_dict(self) -> dict:
        """Which slot is current, and its digest (0 where a client has no state)."""
        rows, slots = np.arange(self.clients), np.maximum(self.current, 0)
        checked = (self.current >= 0) & self.checked[rows, slots]  # a slot of an older checkpoint has none
        digests = np.where(checked, self.digests[rows, slots], 0).astype(np.uint64)
        return {"current": self.current.copy(), "numel": self.numel, "digests": digests, "checked": checked}

    def committed(self) -> None:
        """A checkpoint of the current state_dict is safely on disk: its slots are now protected."""
        self.saved = self.current.copy()

    def load_state_dict(self, state: dict) -> None:
        if state["numel"] != self.numel or len(state["current"]) != self.clients:
            raise ValueError("client states of another shape")
        self.current = np.asarray(state["current"], dtype=np.int8).copy()
        self.saved = self.current.copy()
        live = np.flatnonzero(self.current >= 0)
        if "digests" in state:  # checkpoints written before digests existed are read unchecked
            checked = np.asarray(state.get("checked", self.current >= 0), dtype=bool)
            self.digests[live, self.current[live]] = np.asarray(state["digests"], dtype=np.uint64)[live]
            self.checked[live, self.current[live]] = checked[live]
        if len(live):  # the file must hold every state the checkpoint refers to (contents: checked on read)
            if not self.existed:
                self.path.unlink(missing_ok=True)  # the empty file open() made would read as truncated next time
                raise ClientStateDamaged(
                    f"{self.path} is missing, but the checkpoint refers to {len(live)} clients' states in it "
                    f"(client {live[0]} first); {WHAT_TO_DO}"
                )
            size = os.fstat(self.fd).st_size
            short = [int(c) for c in live if self._offset(int(c), int(self.current[c])) + self.slot_bytes > size]
            if short:
                raise self.damaged(short[0], "is cut short (the file is truncated)")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
