"""Memory of per-client state (flasc/client/state_store.py): peak RSS with 5,000 clients against 50 (target:
at most 1.10x).

    python bench/client_state.py                  # 50 and 5,000 clients
    python bench/client_state.py --clients 50 500 5000

Each size runs in a fresh process (peak RSS is per process), which builds the embedded default's
model (MiniLM-L6 with LoRA rank 16, as a run holds it), opens a ClientStateStore in a temporary
folder with one state per client the size of the whole trainable vector (SCAFFOLD's c_i; FedSA's
B and head are smaller), and then does what a long run does to it: writes every client's state,
checkpoints (flush, committed), writes every state again (the other slot), and reads every one
back (as personalised evaluation does). Prints the peak RSS of each size, their ratio, the file
size on disk and the seconds per state written and read.
"""

from __future__ import annotations

import json
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
    from flasc.client.state_store import ClientStateStore
    from flasc.models.params import FlatParams

    cfg = config_mod.load_config("fedavg")
    model = models.build_model(cfg, 5, 0, False)
    numel = FlatParams(model).numel
    store = ClientStateStore(Path(folder), clients, numel)
    g = torch.Generator().manual_seed(0)
    state = torch.randn(numel, generator=g)
    t0 = time.perf_counter()
    for c in range(clients):
        store.put(c, state + c)
    store.flush()
    store.committed()
    for c in range(clients):
        store.put(c, state - c)
    store.flush()
    write_s = (time.perf_counter() - t0) / (2 * clients)
    t0 = time.perf_counter()
    total = 0.0
    for c in range(clients):
        total += float(store.get(c)[0])
    read_s = (time.perf_counter() - t0) / clients
    expected = sum(float(state[0]) - c for c in range(clients))
    assert abs(total - expected) <= 1e-3 * max(1.0, abs(expected)), "states read back wrong"
    size = (Path(folder) / "client_state.bin").stat().st_size
    store.close()
    return {
        "clients": clients,
        "numel": numel,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": size / 1e6,
        "write_ms": 1e3 * write_s,
        "read_ms": 1e3 * read_s,
    }


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
    print(f"{'clients':>8} {'peak RSS MB':>12} {'file MB':>10} {'write ms':>9} {'read ms':>8}")
    for r in rows:
        print(
            f"{r['clients']:>8} {r['peak_rss_mb']:>12.1f} {r['file_mb']:>10.1f} {r['write_ms']:>9.2f} "
            f"{r['read_ms']:>8.2f}"
        )
    base = rows[0]["peak_rss_mb"]
    for r in rows[1:]:
        print(f"peak RSS {r['clients']} / {rows[0]['clients']} clients: {r['peak_rss_mb'] / base:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main(sys.argv[1:])
