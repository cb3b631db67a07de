"""Split a training set among clients: each client is an index array into one dataset.

Dirichlet label skew (as in FLASC and Hsu et al. 2019): client k draws class proportions
q_k ~ Dir(alpha); each class c is then shared among clients in proportion to q_k[c] / sum_j q_j[c].
Counts are rounded with the largest-remainder rule so that every example goes to exactly one client
(the seed code's plain rounding could drop or run past examples).

Empty or tiny clients: with small alpha some clients may receive (almost) nothing. A client below
`min_size` examples receives examples moved one at a time from the currently largest client, so the
number of clients stays as configured (it enters sampling and privacy accounting) and every client
can train. With min_size=0 empty clients are kept; they train on nothing and send a zero update.
"""

from __future__ import annotations

import numpy as np


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `shares` that sum exactly to `total`."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - counts.sum()
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def dirichlet(
    labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    classes = np.unique(labels)
    q = rng.dirichlet(np.full(len(classes), alpha), size=n_clients)  # (clients, classes)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for j, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        counts = _largest_remainder(q[:, j], len(idx))
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    clients = [np.concatenate(p).astype(np.int64) for p in parts]
    return enforce_min_size(clients, min_size)


def iid(n_examples: int, n_clients: int, rng: np.random.Generator, min_size: int = 1) -> list[np.ndarray]:
    perm = rng.permutation(n_examples).astype(np.int64)
    return enforce_min_size([np.asarray(p) for p in np.array_split(perm, n_clients)], min_size)


def enforce_min_size(clients: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    total = sum(len(c) for c in clients)
    if min_size * len(clients) > total:
        raise ValueError(
            f"min_client_size: {min_size} examples for each of {len(clients)} clients "
            f"needs {min_size * len(clients)}, but the training split has {total}"
        )
    clients = [c.copy() for c in clients]
    sizes = np.array([len(c) for c in clients])
    while sizes.min() < min_size:
        small, large = int(sizes.argmin()), int(sizes.argmax())
        clients[small] = np.append(clients[small], clients[large][-1])
        clients[large] = clients[large][:-1]
        sizes[small] += 1
        sizes[large] -= 1
    return [np.sort(c) for c in clients]


def natural(users: np.ndarray, clients: int, min_size: int = 1) -> list[np.ndarray]:
    """One client per natural user (users[i] is example i's user, numbered 0..U-1 in the data
    set's order): the first `clients` users, or all of them when clients is 0; clients smaller
    than min_size are topped up from the largest, as for the other partitions."""
    users = np.asarray(users)
    n_users = int(users.max()) + 1 if len(users) else 0
    if clients > n_users:
        raise ValueError(f"clients: the dataset has {n_users} users; expected at most {n_users} (0: all of them)")
    n = clients or n_users
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(n + 1))
    return enforce_min_size([np.sort(order[bounds[u] : bounds[u + 1]]).astype(np.int64) for u in range(n)], min_size)


def label_histogram(clients: list[np.ndarray], labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(clients, labels) counts, for reports and tests; labels are class indices (N,) or
    multi-hot rows (N, n_labels), whose columns are summed."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return np.stack([labels[c].sum(0) for c in clients]).astype(np.int64)
    return np.stack([np.bincount(labels[c], minlength=n_labels) for c in clients])


def iid_mix(clients: list[np.ndarray], p: float, rng: np.random.Generator) -> list[np.ndarray]:
    """FLASC's iid-mix: every client keeps a random (1 − p) share of its own examples; the rest of
    everybody's examples is pooled, shuffled and dealt out again in equal parts (the remainder
    round-robin, so no example is lost). p = 0 keeps the natural clients, p = 1 is IID."""
    keep, pool = [], []
    for c in clients:
        c = rng.permutation(c)
        n_keep = int(round((1 - p) * len(c)))
        keep.append(c[:n_keep])
        pool.append(c[n_keep:])
    pool = rng.permutation(np.concatenate(pool)) if pool else np.array([], dtype=np.int64)
    dealt = np.array_split(pool, len(clients))
    return [np.sort(np.concatenate([k, d])).astype(np.int64) for k, d in zip(keep, dealt)]


def report(clients: list[np.ndarray], labels: np.ndarray | None, label_names: list[str]) -> dict:
    """Examples and label histogram per client, and a summary of the skew (sizes only when the
    task has no labels, as in language modelling). With multi-hot labels the distance compares
    each client's share of label occurrences to the whole's."""
    sizes = np.array([len(c) for c in clients], dtype=np.int64)
    summary = {
        "clients": len(clients),
        "examples": int(sizes.sum()),
        "min_examples": int(sizes.min()),
        "median_examples": float(np.median(sizes)),
        "max_examples": int(sizes.max()),
        "empty_clients": int((sizes == 0).sum()),
    }
    if labels is None:
        return {
            "label_names": [],
            "clients": [{"client": i, "examples": int(s)} for i, s in enumerate(sizes)],
            "summary": summary,
        }
    labels = np.asarray(labels)
    hist = label_histogram(clients, labels, len(label_names))
    whole = labels.sum(0) if labels.ndim == 2 else np.bincount(labels, minlength=len(label_names))
    overall = whole / max(whole.sum(), 1)
    counts = hist.sum(1)
    rows = hist[counts > 0] / counts[counts > 0, None]
    tv = 0.5 * np.abs(rows - overall).sum(1) if len(rows) else np.zeros(1)
    return {
        "label_names": list(label_names),
        "clients": [
            {"client": i, "examples": int(s), "labels": h.tolist()} for i, (s, h) in enumerate(zip(sizes, hist))
        ],
        "summary": {**summary, "mean_label_tv_distance": float(tv.mean())},
    }
