"""How much a simulated federated round costs beyond its optimizer steps.

Times Federation.run_round (download mask, in-place state swaps, local training, top-k upload,
aggregation, server step) against a bare training loop doing the same optimizer steps on the same
model and the same batches, and prints the ratio. Target on the embedded default: <= 1.05.

    python bench/round_overhead.py                    # fedavg on bbcnews / MiniLM
    python bench/round_overhead.py --config flasc --rounds 4
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_lora  # noqa: E402
from flasc import models  # noqa: E402
from flasc.client.local import LocalSettings  # noqa: E402
from flasc.client.optimizers import CLIENT_OPTIMIZERS  # noqa: E402
from flasc.tasks.evaluation import logits_of  # noqa: E402


def bare_loop(fed, rnd: int) -> int:
    """The same optimizer steps as round `rnd`, in a plain loop on the same resident model."""
    cfg = fed.cfg
    opt = CLIENT_OPTIMIZERS[cfg.client_opt](fed.flat.params, cfg.client_lr, LocalSettings.of(cfg).hyper)
    models.training_mode(fed.model, cfg.base_dropout)
    steps = 0
    for client in fed.sample_clients(rnd):
        for batch in fed.worker.client_batches(rnd, client):
            loss = fed.task.objective.loss(logits_of(fed.model, batch, fed.device, cfg.bf16), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    if fed.device.type == "cuda":
        torch.cuda.synchronize()
    return steps


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str]) -> None:
    rounds = 3
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    cfg = train_lora.parse_cli(argv or ["--config", "fedavg"])
    fed = train_lora.build(cfg, train_lora.pick_device(cfg.gpu))
    server_state = fed.server.detach().clone()
    bare_loop(fed, 0)  # warm-up: allocator, kernels, caches
    ratios = []
    for rnd in range(rounds):
        # Alternate the two on the same round's batches so machine noise hits both alike.
        t_bare, steps = timed(bare_loop, fed, rnd)
        with torch.no_grad():
            fed.server.copy_(server_state)
        t_round, _ = timed(fed.run_round, rnd)
        ratios.append(t_round / t_bare)
        print(
            f"round {rnd}: {steps} steps, federated round {t_round:.2f} s, bare loop {t_bare:.2f} s, "
            f"ratio {t_round / t_bare:.3f}",
            flush=True,
        )
    print(f"median ratio (federated round / bare loop) over {rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
