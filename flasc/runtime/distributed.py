"""One run over several processes: `torchrun --nproc-per-node N train_lora.py ...`.

docs/scaling.md ("Scaling out") says what each rank does, what is exchanged and what stays
bit-identical across world sizes. This module is the exchange: `World` gathers the round's client
results (every rank needs every update: TIES, Fisher and RegMean merge them one by one), sends
rank 0's values (client states, read from rank 0's file), combines evaluation tallies, and compares
a checksum of the server after each step so that ranks which round differently stop the run
instead of drifting apart. A rank whose work raises sends its error with its results and every rank
ends (RankFailed); a rank that dies breaks the exchange and the others end with RankLost.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from flasc.options import ConfigError
from flasc.runtime.interrupts import Interrupted


class RankFailed(RuntimeError):
    """A rank raised during its client work; the message names the rank and the error."""


class RankLost(RuntimeError):
    """An exchange between ranks failed: a rank died, or did not arrive within dist_timeout."""


def balanced_shares(sizes: list[int], world_size: int) -> list[list[int]]:
    """Positions of `sizes` per rank: the largest client first to the least loaded rank (ties:
    the lower rank), then each share in its original order. Deterministic, so every rank computes
    the same shares."""
    shares, loads = [[] for _ in range(world_size)], [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += sizes[i]
    return [sorted(s) for s in shares]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None  # None: world size 1, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "" if self.size == 1 else f", {self.size} ranks ({self.backend})"

    def my_share(self, sizes: list[int]) -> list[int]:
        return balanced_shares(sizes, self.size)[self.rank]

    def _all_gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:  # gloo: connection closed by a dead peer, or the timeout
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(
                f"rank {self.rank} lost the other ranks ({first}): a rank died (see its "
                f"error above) or did not arrive within dist_timeout"
            ) from None
        return out

    def gather(self, work, device) -> list:
        """Run `work()` (this rank's client work, a list) and return every rank's lists joined.
        Results travel on the CPU and come back on `device`. An error on any rank ends all of
        them: RankFailed everywhere (the failing rank re-raises its own), Interrupted if a rank
        was interrupted."""
        if self.size == 1:
            return work()
        error = mine = None
        try:
            mine = [r.to("cpu") for r in work()]
        except Interrupted as e:
            error = ("interrupt", e.signum, None)
        except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised here
            error, own = ("error", f"{type(e).__name__}: {e}".splitlines()[0], e), e
        parts = self._all_gather((mine, None if error is None else error[:2]))
        for rank, (_, err) in enumerate(parts):
            if err is None:
                continue
            if err[0] == "interrupt":
                raise Interrupted(err[1])
            if rank == self.rank:
                raise own
            raise RankFailed(f"rank {rank} failed: {err[1]}")
        return [r.to(device) for results, _ in parts for r in results]

    def from_main(self, make):
        """Rank 0's `make()` on every rank (world size 1: make()); others do not call make. An
        error in it ends every rank (RankFailed on the others)."""
        if self.size == 1:
            return make()
        return self._sent_by_main(lambda: [make()] * self.size, scatter=False)

    def scatter_from_main(self, make):
        """Rank r receives make()[r], which rank 0 alone computes (a list of one value per rank; world
        size 1: make()[0]). An error in make ends every rank (RankFailed on the others)."""
        if self.size == 1:
            return make()[0]
        return self._sent_by_main(make, scatter=True)

    def _sent_by_main(self, make, scatter: bool):
        """Rank 0 computes one value per rank and sends rank r its own (scatter) or all the same one
        (broadcast); an error in make is sent instead, and raised everywhere."""
        import torch.distributed as dist

        parts, own = None, None
        if self.is_main:
            try:
                parts = [("ok", v) for v in make()]
            except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised here
                parts, own = [("error", f"{type(e).__name__}: {e}".splitlines()[0])] * self.size, e
        box = [None]
        try:
            if scatter:
                dist.scatter_object_list(box, parts, src=0)
            else:
                box = parts[:1] if self.is_main else [None]
                dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(
                f"rank {self.rank} lost rank 0 ({first}): a rank died or did not arrive within dist_timeout"
            ) from None
        status, value = box[0]
        if status == "error":
            if own is not None:
                raise own
            raise RankFailed(f"rank 0 failed: {value}")
        return value

    def combine(self, tally):
        """Every rank's evaluation tally merged into one (world size 1: the tally itself)."""
        if self.size == 1:
            return tally
        parts = self._all_gather(tally)
        combined = parts[0]
        for other in parts[1:]:
            combined.merge(other)
        return combined

    def check_same(self, vector: torch.Tensor, what: str) -> None:
        """Stop the run if the ranks hold different values of `vector` (compared by checksum)."""
        if self.size == 1:
            return
        v = vector.detach().double()
        checksum = (float(v.sum()), float((v * v).sum()), float(v.abs().max()) if v.numel() else 0.0)
        sums = self._all_gather(checksum)
        if any(s != sums[0] for s in sums):
            raise RankFailed(
                f"the ranks disagree on {what} (checksums {sums}); every rank must compute "
                "identically: use identical GPUs, or deterministic: true"
            )

    def close(self) -> None:
        if self.backend is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def pick_device(gpu: str, local_rank: int = 0) -> torch.device:
    """The device of this process (option gpu); under torchrun, auto gives local rank r cuda:(r mod GPUs)."""
    if gpu == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if gpu == "auto":
            return torch.device("cpu")
        raise ConfigError(f"gpu: CUDA device {gpu} was asked for but no CUDA device is visible; expected auto or cpu")
    if gpu == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if int(gpu) >= torch.cuda.device_count():
        raise ConfigError(
            f"gpu: device {gpu} does not exist; expected an index below {torch.cuda.device_count()}, auto or cpu"
        )
    return torch.device("cuda", int(gpu))


def launched_ranks() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun sets them; (0, 1, 0, 1) otherwise."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, 0, 1
    return (int(env["RANK"]), size, int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", str(size))))


def backend_for(device: torch.device, local_size: int, gpu_per_rank: bool) -> str:
    """NCCL when every rank of this node has a GPU of its own (gpu: auto and enough GPUs), gloo
    otherwise (CPU, or GPUs shared by ranks: NCCL refuses two ranks on one device). Every rank
    decides alike, from the config and the node's GPU count."""
    if device.type == "cuda" and gpu_per_rank and local_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def start(device: torch.device, timeout_s: float, gpu_per_rank: bool = True) -> World:
    """The world this process belongs to; joins the process group when launched by torchrun.
    gpu_per_rank: the device was chosen per local rank (gpu: auto), not pinned for every rank."""
    rank, size, local_rank, local_size = launched_ranks()
    if size == 1:
        return World()
    import torch.distributed as dist

    backend = backend_for(device, local_size, gpu_per_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object exchange runs on the current device
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, local_rank, local_size, backend)
