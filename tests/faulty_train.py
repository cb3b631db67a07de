"""train_lora.py with a fault injected, for the kill-and-resume and rank-failure tests.

    FLASC_CRASH_AT=POINT:ROUND[:raise] [FLASC_CRASH_RANK=r] python tests/faulty_train.py ARGS...

runs `train_lora.py ARGS...` and, when the run reaches POINT of round ROUND, kills the process
(SIGKILL, as an out-of-memory kill or a power cut would), or with :raise raises an error there,
or with :sleep writes its pid to FLASC_PID_DIR/rank-R and sleeps (for a test to kill whatever it
wants meanwhile); FLASC_CRASH_RANK limits it to rank r of a torchrun launch. Points:

    mid_round          after a client's result is complete (its update, state and statistics)
    in_training        as a client starts training (where an interrupt ends local training at once)
    after_log          after the round's metrics line is written, before its checkpoint
    checkpoint_write   halfway through writing the round's checkpoint file

The faults are installed by wrapping the functions concerned here, so the production modules
carry no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_lora  # noqa: E402
from flasc.client.worker import ClientWorker  # noqa: E402
from flasc.runtime import checkpoint, tracking  # noqa: E402


def fail(point: str, rnd: int, mode: str) -> None:
    if mode == "raise":
        raise RuntimeError(f"injected failure at {point} of round {rnd}")
    if mode == "sleep":
        marks = Path(os.environ["FLASC_PID_DIR"])
        (marks / f"rank-{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
        time.sleep(600)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    point, rnd, *mode = spec.split(":")
    rnd, mode = int(rnd), (mode[0] if mode else "kill")
    if point == "mid_round":
        finish_job = ClientWorker.finish_job

        def finish_then_fail(self, r, *args, **kwargs):
            result = finish_job(self, r, *args, **kwargs)
            if r + 1 == rnd and not result.diverged:
                fail(point, rnd, mode)
            return result

        ClientWorker.finish_job = finish_then_fail
    elif point == "in_training":
        train_job = ClientWorker.train_job

        def fail_then_train(self, r, *args, **kwargs):
            if r + 1 == rnd:
                fail(point, rnd, mode)
            return train_job(self, r, *args, **kwargs)

        ClientWorker.train_job = fail_then_train
    elif point == "after_log":
        for log in (tracking.RunLog, tracking.NoRunLog):  # rank 0's run folder, or another rank's none

            def log_then_fail(self, record, log_round=log.log_round):
                log_round(self, record)
                if record["round"] == rnd:
                    fail(point, rnd, mode)

            log.log_round = log_then_fail
    elif point == "checkpoint_write":
        save = checkpoint.save

        def half_a_file(run_dir, state):
            if state["round"] != rnd:
                return save(run_dir, state)
            blob = checkpoint.encode(state)
            with open(Path(run_dir) / (checkpoint.FILE + ".tmp"), "wb") as f:
                f.write(blob[: len(blob) // 2])
                f.flush()
            fail(point, rnd, mode)

        checkpoint.save = half_a_file
    else:
        raise SystemExit(f"faulty_train.py: unknown point {point}")


if __name__ == "__main__":
    spec = os.environ.get("FLASC_CRASH_AT", "")
    rank = os.environ.get("RANK", "0")
    if spec and os.environ.get("FLASC_CRASH_RANK", rank) == rank:
        install(spec)
    sys.exit(train_lora.main())
