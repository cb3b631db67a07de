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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

FILE = "client_state.bin"
VALUE = np.dtype("<f4")


class ClientStateStore:
    def __init__(self, folder: Path | None, clients: int, numel: int):
        """folder: where client_state.bin goes (None: a private temporary file, removed on close)."""
        self.clients, self.numel = clients, numel
        self.slot_bytes = numel * VALUE.itemsize
        if folder is None:
            fd, name = tempfile.mkstemp(prefix="flasc_client_state_")
            os.unlink(name)  # anonymous: gone when closed or when the process dies
            self.fd = fd
        else:
            self.fd = os.open(Path(folder) / FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self.current = np.full(clients, -1, dtype=np.int8)  # slot holding each client's state, -1: none yet
        self.saved = np.full(clients, -1, dtype=np.int8)  # slot the last checkpoint refers to

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
        raw = os.pread(self.fd, self.slot_bytes, self._offset(client, slot))
        if len(raw) != self.slot_bytes:
            raise OSError(f"{FILE}: client {client}'s state is truncated on disk")
        return torch.from_numpy(np.frombuffer(raw, dtype=VALUE).copy())

    def put(self, client: int, state: torch.Tensor) -> None:
        """Store the client's new state, in the slot the last checkpoint does not refer to."""
        values = state.detach().to("cpu", torch.float32).reshape(-1)
        if values.numel() != self.numel:
            raise ValueError(f"client state of {values.numel()} values; the store holds {self.numel}")
        slot = 1 if self.saved[client] == 0 else 0
        data = values.numpy().astype(VALUE, copy=False).tobytes()
        written = os.pwrite(self.fd, data, self._offset(client, slot))
        if written != len(data):
            raise OSError(f"{FILE}: short write of client {client}'s state (disk full?)")
        self.current[client] = slot

    def flush(self) -> None:
        """Every state written so far is on disk (called before a checkpoint refers to them)."""
        os.fsync(self.fd)

    def state_dict(self) -> dict:
        return {"current": self.current.copy(), "numel": self.numel}

    def committed(self) -> None:
        """A checkpoint of the current state_dict is safely on disk: its slots are now protected."""
        self.saved = self.current.copy()

    def load_state_dict(self, state: dict) -> None:
        if state["numel"] != self.numel or len(state["current"]) != self.clients:
            raise ValueError("client states of another shape")
        self.current = np.asarray(state["current"], dtype=np.int8).copy()
        self.saved = self.current.copy()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
