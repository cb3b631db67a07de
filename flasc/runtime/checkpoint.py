"""Checkpoints of a run, written atomically, and the resume that continues them exactly; what a
checkpoint holds and how a resume behaves is in docs/studies.md ("Checkpoints and resume").

The file is MAGIC, the SHA-256 of the payload, then the payload (torch.save's bytes), written to a
temporary file, flushed to disk and renamed over the old one: a crash at any moment leaves the
previous checkpoint or the new one, and a resume verifies the digest, so a flipped bit is refused
instead of silently changing the run. Client states are in client_state.bin
(flasc/client/state_store.py), flushed before the checkpoint that names their slots.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from flasc import options as config_mod
from flasc.runtime import files

FILE = "checkpoint.pt"
FORMAT = 2
MAGIC = b"FLASCCK2"
DIGEST_BYTES = 32


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def config_fingerprint(cfg, keys=None, outside=("dir", "name", "server_rounds")) -> str:
    """Identifies what a checkpoint was made under: every option (or those of `keys`) except where
    runs are written and how many rounds the run is to have (the checkpoint keeps that apart:
    `--resume --server-rounds N` continues a run to another number of rounds)."""
    keys = sorted(k for k in (cfg if keys is None else keys) if k not in outside)
    return hashlib.sha1(repr([(k, cfg[k]) for k in keys]).encode()).hexdigest()[:16]


def saved_config(run_dir: Path) -> dict:
    return config_mod.yaml_load(config_mod.read_text(run_dir / "config.yaml", "the run's saved config"))


def made_under(state: dict, cfg, run_dir: Path) -> bool:
    """Whether a checkpoint was written under cfg (its number of rounds aside). A run started before
    an option existed saved a config.yaml without it, and its checkpoints fingerprint the options it
    had: the option takes its default (which is how flasc behaved before it), so those options are
    compared. Checkpoints written before the number of rounds was kept apart fingerprint it too."""
    saved = saved_config(run_dir)
    older = [k for k in saved if k in cfg]
    candidates = [config_fingerprint(cfg, keys) for keys in (None, older)]
    if "server_rounds" not in state:  # an older checkpoint: its fingerprint has the rounds config.yaml says
        legacy = {**cfg, "server_rounds": saved.get("server_rounds", cfg.server_rounds)}
        candidates += [config_fingerprint(legacy, keys, ("dir", "name")) for keys in (None, older)]
    return state.get("config_fingerprint") in candidates


def encode(state: dict) -> bytes:
    """The checkpoint file's bytes: MAGIC, the SHA-256 of the payload, the payload."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def save(run_dir: Path, state: dict) -> None:
    """Write the checkpoint atomically: a temporary file, flushed to disk, renamed over the old one
    (which a write that fails, WriteFailed, leaves as it was)."""
    files.write_atomic(run_dir / FILE, encode(state))


def read(path: Path) -> dict:
    """The state saved in a checkpoint file, its checksum verified (CheckpointError otherwise)."""
    blob = path.read_bytes()
    head = len(MAGIC) + DIGEST_BYTES
    if not blob.startswith(MAGIC):
        raise CheckpointError(
            f"--resume: {path} is damaged or not a checkpoint of this flasc version "
            "(no checkpoint header); start the run again"
        )
    if hashlib.sha256(blob[head:]).digest() != blob[len(MAGIC) : head]:
        raise CheckpointError(
            f"--resume: {path} is damaged (its content does not match its checksum); start the run again"
        )
    try:
        state = torch.load(io.BytesIO(blob[head:]), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"--resume: {path} is damaged and cannot be read ({type(e).__name__}); start the run again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {path} has an unknown format; it was written by another version of flasc")
    return state


def load(run_dir: Path, cfg, numel: int, rounds_given: bool = False) -> dict:
    """The checkpoint of run_dir, checked against cfg. rounds_given: cfg.server_rounds comes from
    `--resume --server-rounds N` (otherwise it must be the checkpoint's)."""
    path = run_dir / FILE
    if not path.is_file():
        raise CheckpointError(
            f"--resume: {run_dir} has no {FILE}; it was stopped before its first checkpoint, start it again instead"
        )
    state = read(path)
    if not made_under(state, cfg, run_dir):
        raise CheckpointError(
            f"--resume: {path} was written under another configuration than "
            f"{run_dir / 'config.yaml'}; it cannot continue this run"
        )
    # the rounds the run was to have (an older checkpoint does not say: its config.yaml does)
    planned = state.setdefault("server_rounds", saved_config(run_dir).get("server_rounds", cfg.server_rounds))
    if planned != cfg.server_rounds and not rounds_given:
        raise CheckpointError(
            f"--resume: {path} continues the run to {planned} rounds but {run_dir / 'config.yaml'} says "
            f"{cfg.server_rounds}; resume with --server-rounds {planned}"
        )
    if cfg.server_rounds < state["round"]:
        raise CheckpointError(
            f"--server-rounds: {cfg.server_rounds} is fewer than the {state['round']} rounds {run_dir} has done; "
            f"expected at least {state['round']}"
        )
    if planned != cfg.server_rounds and cfg.server_schedule != "constant":
        raise CheckpointError(
            f"--server-rounds: the server's lr schedule ({cfg.server_schedule}) spans server_rounds, so {run_dir} "
            f"cannot continue to {cfg.server_rounds} rounds as a run started with {cfg.server_rounds} would; "
            "expected server_schedule: constant"
        )
    if planned != cfg.server_rounds and cfg.client_schedule != "constant":
        raise CheckpointError(
            f"--server-rounds: the clients' lr schedule ({cfg.client_schedule}) spans server_rounds, so {run_dir} "
            f"cannot continue to {cfg.server_rounds} rounds as a run started with {cfg.server_rounds} would; "
            "expected client_schedule: constant"
        )
    if state["federation"]["server"].numel() != numel:
        raise CheckpointError(
            f"--resume: {path} holds {state['federation']['server'].numel()} trainable values but the "
            f"model has {numel}; the model or its adapters changed"
        )
    return state
