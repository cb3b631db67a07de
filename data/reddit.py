"""Reddit next-word prediction as in the FLASC seeds: one user per client, already tokenized.

The layout the seeds read, under DATA_DIR/reddit/: train_clients.json and eval_clients.json (the
user names, as the keys of a mapping or as a list) and cache/<user>.pt, a torch file holding
{'X': LongTensor (sequences, length)} of GPT-2 token ids right-padded with the pad token. The first
80% of the training users are the clients, the other 20% are pooled for validation; the eval users
are pooled for testing. Padding is the trailing run of pad tokens of each row, so a pad (= GPT-2's
end-of-text) token inside a text stays a token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.base import DataUnavailable
from data.text import Split

FILES = ("train_clients.json", "eval_clients.json")


def _users(path: Path) -> list[str]:
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise DataUnavailable(f"dataset reddit: {path} is not readable JSON ({e})") from None
    if isinstance(names, dict):
        names = list(names)
    if not isinstance(names, list) or not names:
        raise DataUnavailable(f"dataset reddit: {path} must list at least one user (a mapping or a list)")
    return [str(n) for n in names]


def _tokens(folder: Path, user: str) -> torch.Tensor:
    path = folder / "cache" / f"{user}.pt"
    try:
        x = torch.load(path, weights_only=True)["X"]
    except FileNotFoundError:
        raise DataUnavailable(f"dataset reddit: user {user} has no token file {path}") from None
    except Exception as e:  # damaged file, not a mapping, no 'X'
        raise DataUnavailable(
            f"dataset reddit: {path} is not a torch file with a token tensor 'X' ({type(e).__name__})"
        ) from None
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.is_floating_point():
        raise DataUnavailable(
            f"dataset reddit: {path} 'X' has shape {tuple(x.shape)}; expected integer token ids (sequences, length)"
        )
    return x.long()


def trailing_padding_mask(x: torch.Tensor, pad_id: int) -> torch.Tensor:
    """1 up to and including each row's last non-pad token, 0 after it."""
    not_pad = (x != pad_id).long()
    last = torch.where(not_pad.any(1), x.shape[1] - 1 - not_pad.flip(1).argmax(1), torch.full_like(not_pad[:, 0], -1))
    return (torch.arange(x.shape[1]).unsqueeze(0) <= last.unsqueeze(1)).long()


def _split(blocks: list[torch.Tensor], pad_id: int, max_length: int) -> Split:
    width = max(b.shape[1] for b in blocks)
    x = torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad_id) for b in blocks])
    if max_length:
        x = x[:, :max_length]
    return Split(x, trailing_padding_mask(x, pad_id))


def find_folder(data_dir: str) -> Path:
    folder = Path(data_dir) / "reddit"
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DataUnavailable(
            f"dataset reddit: {', '.join(missing)} not found in {folder}/; put the FLASC Reddit data there "
            f"(train_clients.json, eval_clients.json and cache/<user>.pt token files)"
        )
    return folder


def load_splits(data_dir: str, tokenizer, max_length: int) -> tuple[dict[str, Split], np.ndarray]:
    """The splits and the user index of every training sequence; tokenizer() -> (tokenizer, tag)
    is asked for its pad token only once the files are found."""
    folder = find_folder(data_dir)
    pad_id = tokenizer()[0].pad_token_id
    train_users, eval_users = (_users(folder / f) for f in FILES)
    n_clients = int(0.8 * len(train_users))
    if n_clients == 0:
        raise DataUnavailable(
            f"dataset reddit: {folder / FILES[0]} lists {len(train_users)} user(s); "
            "80% of them train, so at least 2 are needed"
        )
    train_blocks = [_tokens(folder, u) for u in train_users[:n_clients]]
    val_blocks = [_tokens(folder, u) for u in train_users[n_clients:]]  # never empty: int(0.8 n) < n
    users = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in enumerate(train_blocks)])
    return {
        "train": _split(train_blocks, pad_id, max_length),
        "val": _split(val_blocks, pad_id, max_length),
        "test": _split([_tokens(folder, u) for u in eval_users], pad_id, max_length),
    }, users
