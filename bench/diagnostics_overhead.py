"""What the merging diagnostics cost: drift statistics on vs off, and each shadow strategy per round.

    python bench/diagnostics_overhead.py                     # fedavg on the embedded default
    python bench/diagnostics_overhead.py --rounds 3 -- --config flasc

1. drift_stats: the same rounds run with the statistics on and off, alternately from the same server
   state (so machine noise hits both alike); the median ratio of the round times (target <= 1.05).
2. shadows: one round with every strategy as a shadow (factor space, and ties / regmean in product
   space); each shadow's seconds (aggregation, server step, evaluation on the validation split) as
   a share of the round without shadows, and the client-side statistics they need (Fisher, Gram).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config as config_mod  # noqa: E402
import train_lora  # noqa: E402
from flasc.diagnostics.drift import Drift  # noqa: E402
from merging import STRATEGIES  # noqa: E402


def timed_round(fed, rnd: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    record = fed.run_round(rnd)
    return time.perf_counter() - t0, record


def main(argv: list[str]) -> None:
    rounds = 3
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds, argv = int(argv[i + 1]), argv[:i] + argv[i + 2 :]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    cfg = train_lora.parse_cli(extra or ["--config", "fedavg"])
    fed = train_lora.build(cfg, train_lora.pick_device(cfg.gpu))
    ratios = []
    drift = [part for part in fed.callbacks if isinstance(part, Drift)]
    timed_round(fed, 0)  # warm-up
    for rnd in range(1, rounds + 1):
        start = copy.deepcopy(fed.server_state.state_dict())
        times = {}
        for flag in (False, True):
            fed.server_state.load_state_dict(copy.deepcopy(start))
            fed.callbacks = drift if flag else []
            times[flag], _ = timed_round(fed, rnd)
        ratios.append(times[True] / times[False])
        print(
            f"round {rnd}: drift statistics on {times[True]:.2f} s, off {times[False]:.2f} s, ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(f"drift statistics: median ratio (on / off) over {rounds} rounds: {statistics.median(ratios):.3f}")

    names = sorted(STRATEGIES) + ["ties@product", "regmean@product"]
    shadow_cfg = config_mod.Config({**cfg, "shadow_strategies": names})
    shadowed = train_lora.build(shadow_cfg, fed.device)
    shadowed.server_state.load_state_dict(copy.deepcopy(fed.server_state.state_dict()))
    plain_seconds, _ = timed_round(fed, rounds + 1)
    total, record = timed_round(shadowed, rounds + 1)
    print(
        f"round {rounds + 1} without shadows: {plain_seconds:.2f} s; with {len(names)} shadows: {total:.2f} s, "
        f"of which client-side statistics (Fisher, Gram) {record['stats_seconds']:.2f} s"
    )
    for name in names:
        s = record[f"shadow_{name}_seconds"]
        print(f"  shadow {name:18s} {s:6.2f} s  ({s / plain_seconds:.3f} of a round)")


if __name__ == "__main__":
    main(sys.argv[1:])
