"""Memory and time of per-client state (flasc/client/state_store.py): peak RSS with 5,000 clients against
50 (target: at most 1.10x), and what the states' checksums cost (target: at most 10% of a state's
read / write).

    python bench/client_state.py                  # 50 and 5,000 clients
    python bench/client_state.py --clients 50 500 5000

Each size runs in a fresh process (peak RSS is per process), which builds the embedded default's
model (MiniLM-L6 with LoRA rank 16, as a run holds it), opens a ClientStateStore in a temporary
folder with one state per client the size of the whole trainable vector (SCAFFOLD's c_i; FedSA's
B and head are smaller), and then does what a long run does to it: writes every client's state,
checkpoints (flush, committed), writes every state again (the other slot), and reads every one
back (as personalised evaluation does). Prints the peak RSS of each size, their ratio, the file
size on disk, and the milliseconds per state written and read, before (the store without
checksums, UncheckedStore below, on the same states interleaved with the store's) and after, and
per checksum (one XXH3 digest of a slot, which a write and a read each take once). A round reads
a client's state and writes its new one: the round trip's ratio after / before is the cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(clients: int, folder: str) -> dict:
    import torch

    import config as config_mod
    from flasc import models
    from flasc.client.state_store import ClientStateStore, digest
    from flasc.models.params import FlatParams

    cfg = config_mod.load_config("fedavg")
    model = models.build_model(cfg, 5, 0, False)
    numel = FlatParams(model).numel
    store = ClientStateStore(Path(folder), clients, numel)
    g = torch.Generator().manual_seed(0)
    state = torch.randn(numel, generator=g)
    before = UncheckedStore(Path(folder) / "before.bin", store.slot_bytes)
    timer = {"write": 0.0, "read": 0.0, "checksum": 0.0, "before_write": 0.0, "before_read": 0.0}
    for sign in (1, -1):  # every client written twice: both slots
        for c in range(clients):
            with timed(timer, "write"):
                store.put(c, state + sign * c)
            with timed(timer, "before_write"):
                before.put(c, state + sign * c, slot=(1 - sign) // 2)
        store.flush()
        store.committed()
    total = 0.0
    for c in range(clients):
        with timed(timer, "before_read"):
            before.get(c, slot=1)
        with timed(timer, "read"):
            values = store.get(c)
        with timed(timer, "checksum"):  # what put and get each spend on it: one digest of the slot
            digest(values.numpy())
        total += float(values[0])
    expected = sum(float(state[0]) - c for c in range(clients))
    assert abs(total - expected) <= 1e-3 * max(1.0, abs(expected)), "states read back wrong"
    size = (Path(folder) / "client_state.bin").stat().st_size
    store.close()
    return {
        "clients": clients,
        "numel": numel,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": size / 1e6,
        **{f"{k}_ms": 1e3 * v / (2 * clients if k.endswith("write") else clients) for k, v in timer.items()},
    }


class UncheckedStore:
    """The "before": the store's reads and writes as they were without checksums (flasc 0.x up to commit
    cc276db): pwrite of the state's bytes, pread into bytes then a copy into the tensor."""

    def __init__(self, path: Path, slot_bytes: int):
        self.fd, self.slot_bytes = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), slot_bytes

    def put(self, client: int, state, slot: int) -> None:
        import numpy as np
        import torch

        values = state.detach().to("cpu", torch.float32).reshape(-1)
        os.pwrite(self.fd, values.numpy().astype(np.dtype("<f4"), copy=False).tobytes(), self._at(client, slot))

    def get(self, client: int, slot: int):
        import numpy as np
        import torch

        raw = os.pread(self.fd, self.slot_bytes, self._at(client, slot))
        return torch.from_numpy(np.frombuffer(raw, dtype=np.dtype("<f4")).copy())

    def _at(self, client: int, slot: int) -> int:
        return (2 * client + slot) * self.slot_bytes


@contextlib.contextmanager
def timed(timer: dict, key: str):
    t0 = time.perf_counter()
    yield
    timer[key] += time.perf_counter() - t0


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        print(json.dumps(child(int(argv[1]), argv[2])))
        return
    sizes = [int(x) for x in argv[argv.index("--clients") + 1 :]] if "--clients" in argv else [50, 5000]
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=ROOT) as folder:  # on the disk runs use, not a RAM /tmp
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), folder], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"state of {rows[0]['numel']:,} fp32 values per client ({rows[0]['numel'] * 4 / 1e6:.2f} MB)")
    print(
        f"{'clients':>8} {'peak RSS MB':>12} {'file MB':>10}   write ms before/after   read ms before/after   "
        "checksum ms"
    )
    for r in rows:
        print(
            f"{r['clients']:>8} {r['peak_rss_mb']:>12.1f} {r['file_mb']:>10.1f}   {r['before_write_ms']:>9.3f} "
            f"{r['write_ms']:>6.3f} ({r['write_ms'] / r['before_write_ms']:.3f})   {r['before_read_ms']:>8.3f} "
            f"{r['read_ms']:>6.3f} ({r['read_ms'] / r['before_read_ms']:.3f})   {r['checksum_ms']:>8.3f}"
        )
    for r in rows:
        trip, old = r["write_ms"] + r["read_ms"], r["before_write_ms"] + r["before_read_ms"]
        print(
            f"{r['clients']} clients: a round trip (write + read) after / before {trip / old:.3f} (target <= 1.10); "
            f"its two checksums are {2 * r['checksum_ms'] / trip:.3f} of it"
        )
    base = rows[0]["peak_rss_mb"]
    for r in rows[1:]:
        print(f"peak RSS {r['clients']} / {rows[0]['clients']} clients: {r['peak_rss_mb'] / base:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main(sys.argv[1:])
