"""Nothing lost, nothing silent (issue 23): damaged client states, full and read-only disks,
undecodable files, dead launchers; each fault ends with one line, a non-zero exit and no
traceback, and the run's last good files are kept."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import toy_spec

import config
import data
import train_lora
from flasc.client.state_store import FILE as STATE_FILE
from flasc.client.worker import ClientWorker
from flasc.runtime import checkpoint, tracking
from flasc.runtime.interrupts import Interrupted


def argv_of(overrides: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={config.yaml_value(v)}" for k, v in overrides.items()]


def one_error_line(err: str, *needles: str) -> str:
    """stderr holds exactly one error line, no traceback, and it says each of `needles`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Logging error" not in err, err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    print(f"LINE {errors[0]}", file=sys.__stderr__)  # pytest -s shows the lines the docs quote
    return errors[0]


@pytest.fixture
def stateful(tiny_overrides):
    """FedSA-LoRA on 4 clients, 2 a round, personal evaluation (which reads every client's state)."""
    return {
        **tiny_overrides,
        "algorithm": "fedsa",
        "clients": 4,
        "server_batch": 2,
        "server_rounds": 3,
        "eval_freq": 1,
        "ckpt_freq": 1,
        "eval_personalized": True,
    }


def stopped_in_round(argv: list[str], monkeypatch, rnd: int) -> None:
    """Run train_lora.py with a SIGTERM while round `rnd` (1-based) trains: it checkpoints round
    rnd - 1 and ends."""
    real = ClientWorker.train_client

    def interrupted(self, r, *args):
        if r + 1 == rnd:
            raise Interrupted(signal.SIGTERM)
        return real(self, r, *args)

    monkeypatch.setattr(ClientWorker, "train_client", interrupted)
    assert train_lora.main(argv) == 143
    monkeypatch.setattr(ClientWorker, "train_client", real)


def live_slots(run_dir) -> tuple[list[tuple[int, int]], int]:
    """(client, byte offset) of every state the checkpoint refers to, and a slot's size in bytes."""
    states = checkpoint.read(run_dir / checkpoint.FILE)["federation"]["client_states"]
    slot_bytes = 4 * states["numel"]
    return [(c, (2 * c + int(s)) * slot_bytes) for c, s in enumerate(states["current"]) if s >= 0], slot_bytes


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete"])
def test_a_damaged_client_state_stops_the_resume_naming_the_client_and_file(
    stateful, monkeypatch, capsys, tmp_path, fault
):
    stopped_in_round(argv_of(stateful), monkeypatch, 3)
    run_dir = tmp_path / "runs" / "run"
    (client, offset), slot_bytes = live_slots(run_dir)[0][0], live_slots(run_dir)[1]
    path = run_dir / STATE_FILE
    saved_checkpoint = (run_dir / checkpoint.FILE).read_bytes()
    if fault == "flip":
        with open(path, "r+b") as f:
            f.seek(offset + slot_bytes // 2)
            byte = f.read(1)
            f.seek(offset + slot_bytes // 2)
            f.write(bytes([byte[0] ^ 0x10]))
    elif fault == "truncate":
        last = max(o for _, o in live_slots(run_dir)[0])
        client = next(c for c, o in live_slots(run_dir)[0] if o == last)
        with open(path, "r+b") as f:
            f.truncate(last + slot_bytes - 1)
    else:
        path.unlink()
    capsys.readouterr()
    assert train_lora.main(["--resume", str(run_dir)]) == 2
    what = {"flip": "does not match the checksum", "truncate": "is cut short", "delete": "is missing"}[fault]
    one_error_line(capsys.readouterr().err, str(path), f"client {client}", what, "earlier copy", "start the run again")
    assert (run_dir / checkpoint.FILE).read_bytes() == saved_checkpoint  # the last good checkpoint is kept
    assert not (run_dir / "summary.json").exists()
    assert path.exists() == (fault != "delete")  # a missing file is not replaced by an empty one


def test_a_state_damaged_during_the_run_is_caught_on_its_next_read(stateful, tmp_path):
    """A flipped byte in a slot written this session (not yet checkpointed) is caught too."""
    cfg = config.load_config(overrides=stateful)
    fed = train_lora.build(cfg, train_lora.pick_device("cpu"))
    fed.attach_store(tmp_path)
    fed.run_round(0)
    client = next(c for c in range(cfg.clients) if fed.store.has(c))
    offset = (2 * client + int(fed.store.current[client])) * fed.store.slot_bytes
    with open(tmp_path / STATE_FILE, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(checkpoint.CheckpointError, match=f"client {client}'s stored state does not match"):
        fed.client_states([client])
    fed.store.close()


# ---------------------------------------------------------------- metrics.jsonl
@pytest.mark.parametrize("fault", ["lost_tail", "deleted", "changed"])
def test_a_resume_refuses_metrics_that_lost_or_changed_rounds(tiny_overrides, monkeypatch, capsys, tmp_path, fault):
    """The checkpoint of round 2 saw two lines; losing one (a tail not yet on disk when the machine
    died), the file, or a changed byte is refused, and the file is left as it was (no NUL padding)."""
    stopped_in_round(argv_of({**tiny_overrides, "ckpt_freq": 1, "eval_freq": 1}), monkeypatch, 3)
    run_dir = tmp_path / "runs" / "run"
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    if fault == "lost_tail":
        metrics.write_bytes(lines[0])
    elif fault == "deleted":
        metrics.unlink()
    else:
        metrics.write_bytes(lines[0].replace(b'"round": 1', b'"round": 7') + lines[1])
    before = metrics.read_bytes() if metrics.exists() else None
    capsys.readouterr()
    assert train_lora.main(["--resume", str(run_dir)]) == 2
    what = {"lost_tail": "ends before the rounds", "deleted": "is missing", "changed": "is damaged"}[fault]
    one_error_line(capsys.readouterr().err, str(metrics), what, "start the run again")
    assert (metrics.read_bytes() if metrics.exists() else None) == before


def test_a_resume_cuts_metrics_back_to_its_checkpoint(tiny_overrides, monkeypatch, tmp_path):
    """Rounds logged after the checkpoint (a crash between the two) are cut back, byte for byte."""
    overrides = {**tiny_overrides, "ckpt_freq": 2, "eval_freq": 1, "server_rounds": 5}
    stopped_in_round(argv_of(overrides), monkeypatch, 4)  # rounds 1-3 logged, 3 checkpointed on the interrupt
    run_dir = tmp_path / "runs" / "run"
    metrics = run_dir / "metrics.jsonl"
    kept = metrics.read_bytes()
    metrics.write_bytes(kept + b'{"round": 4, "train_loss": 1.0}\n')  # a line its checkpoint never saw
    state = checkpoint.read(run_dir / checkpoint.FILE)
    assert state["metrics_offset"] == len(kept)
    assert train_lora.main(["--resume", str(run_dir)]) == 0
    rounds = [json.loads(x)["round"] for x in metrics.read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5] and metrics.read_bytes().startswith(kept)


@pytest.mark.parametrize("damage", [b"\x00\x00\x00\x00\n", b'{"round": 3, "test_acc\n', b"\xff\xfe\n"])
def test_plot_and_the_study_tables_refuse_a_damaged_metrics_file(tiny_overrides, capsys, tmp_path, damage):
    import plot
    from flasc.studies import tables

    assert train_lora.main(argv_of({**tiny_overrides, "server_rounds": 2})) == 0
    run_dir = tmp_path / "runs" / "run"
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + damage)
    capsys.readouterr()
    assert plot.main([str(run_dir), "--out", str(tmp_path / "figs")]) == 2
    one_error_line(capsys.readouterr().err, str(metrics), "line 3" if damage[0] != 0xFF else "not UTF-8", "damaged")
    assert not (tmp_path / "figs").exists()
    with pytest.raises(tracking.DamagedRecord, match="damaged"):
        tables._metrics(run_dir)


# ---------------------------------------------------------------- full and read-only disks
@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes (skipped where mounting is not allowed)."""
    mounted = []

    def mount(size: int, name: str = "disk") -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; returns the filler (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    return filler


def without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if "seconds" not in k} for m in tracking.read_jsonl(run_dir / "metrics.jsonl")]


def same_adapter(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_new_run_on_a_full_disk_says_so_and_leaves_no_folder(tiny_overrides, small_disk, capsys):
    disk = small_disk(64 * 1024)
    fill(disk)
    code = train_lora.main(argv_of({**tiny_overrides, "dir": str(disk / "runs")}))
    assert code == tracking.EXIT_CODE["write_failed"]
    one_error_line(capsys.readouterr().err, f"cannot write {disk / 'runs' / 'run'}", "No space left on device")
    assert list((disk / "runs").iterdir()) == []  # the name is free for the rerun


def test_a_new_run_past_its_file_size_limit_leaves_no_folder(tiny_overrides, capsys, tmp_path):
    """RLIMIT_FSIZE (no mount needed): the first file of the run folder cannot be written."""
    train_lora.main(argv_of({**tiny_overrides, "name": "cache", "server_rounds": 1}))  # the data cache, first
    capsys.readouterr()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, limits[1]))
    try:
        code = train_lora.main(argv_of(tiny_overrides))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert code == tracking.EXIT_CODE["write_failed"]
    one_error_line(capsys.readouterr().err, str(tmp_path / "runs" / "run"), "File too large", "nothing was kept")
    assert not (tmp_path / "runs" / "run").exists()


def fault_after_checkpoint(monkeypatch, rounds: int, fault) -> None:
    """fault() once the checkpoint of round `rounds` is on disk."""
    save = checkpoint.save

    def save_then_fault(run_dir, state):
        save(run_dir, state)
        if state["round"] == rounds:
            fault()

    monkeypatch.setattr(checkpoint, "save", save_then_fault)


@pytest.mark.parametrize("fault, at", [("full", 2), ("read_only", 2), ("full", 4)])
def test_a_run_whose_disk_fills_or_turns_read_only_stops_and_resumes_exactly(
    tiny_overrides, small_disk, monkeypatch, capsys, tmp_path, fault, at
):
    """After the checkpoint of round `at` (4: the last, before the adapter and summary are written)."""
    overrides = {**tiny_overrides, "server_rounds": 4, "ckpt_freq": 1, "eval_freq": 1}
    assert train_lora.main(argv_of({**overrides, "name": "ref"})) == 0
    disk = small_disk(16 * 1024 * 1024)
    filler = []

    run_dir = disk / "runs" / "run"

    def break_disk():
        if fault == "full":
            filler.append(fill(disk))
        else:  # a read-only view of the run folder over it: every file opened from now on is read-only
            subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)], check=True)

    fault_after_checkpoint(monkeypatch, at, break_disk)
    argv = argv_of({**overrides, "dir": str(disk / "runs")})
    capsys.readouterr()
    assert train_lora.main(argv) == tracking.EXIT_CODE["write_failed"]
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    one_error_line(capsys.readouterr().err, str(run_dir), reason, f"checkpoint of round {at}", f"--resume {run_dir}")
    assert checkpoint.read(run_dir / checkpoint.FILE)["round"] == at  # the last good checkpoint, readable
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "summary.json").exists()  # nothing half-written
    monkeypatch.setattr(checkpoint, "save", SAVE)
    if fault == "full":
        filler[0].unlink()
    else:
        subprocess.run(["umount", str(run_dir)], check=True)
    assert train_lora.main(["--resume", str(run_dir)]) == 0
    ref = tmp_path / "runs" / "ref"
    assert without_timing(run_dir) == without_timing(ref)
    assert same_adapter(run_dir, ref)


SAVE = checkpoint.save


def read_only_view(folder: Path, small_disk) -> Path:
    """A read-only mount showing folder's files (skipped where mounting is not allowed)."""
    view = small_disk(1024 * 1024, name=f"ro-{folder.name}")
    subprocess.run(["umount", str(view)], check=True)
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(view)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({done.stderr.decode().strip()})")
    return view


def test_a_read_only_data_dir_without_the_cache_is_said_to_be_so(tiny_overrides, small_disk, capsys, tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    data_dir = read_only_view(empty, small_disk)
    assert train_lora.main(argv_of({**tiny_overrides, "data_dir": str(data_dir)})) == 2
    one_error_line(
        capsys.readouterr().err,
        f"data_dir {data_dir} is read-only",
        "holds no cache for toy",
        "max_length 16",
        "point data_dir at a writable folder",
    )
    assert not (tmp_path / "runs" / "run").exists()


def test_a_read_only_data_dir_with_the_cache_is_used(tiny_overrides, small_disk, capsys, tmp_path):
    assert train_lora.main(argv_of({**tiny_overrides, "name": "writable", "server_rounds": 1})) == 0
    data_dir = read_only_view(tmp_path / "data", small_disk)
    assert train_lora.main(argv_of({**tiny_overrides, "data_dir": str(data_dir), "server_rounds": 1})) == 0
    # another max_length has no cache there: said so, not a traceback
    capsys.readouterr()
    assert train_lora.main(argv_of({**tiny_overrides, "data_dir": str(data_dir), "max_length": 12})) == 2
    one_error_line(capsys.readouterr().err, "is read-only", "max_length 12")


@pytest.mark.parametrize("where", ["/proc/flasc-runs", "read-only"])
def test_a_runs_folder_that_cannot_be_made_is_refused_before_anything_loads(
    tiny_overrides, small_disk, capsys, tmp_path, where
):
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        where = str(read_only_view(tmp_path / "ro", small_disk) / "runs")
    assert train_lora.main(argv_of({**tiny_overrides, "dir": where})) == 2
    one_error_line(capsys.readouterr().err, "dir: ", "is not writable", "expected a folder the runs can be written to")
    assert not (tmp_path / "data").exists()  # refused before the data were loaded


# ---------------------------------------------------------------- undecodable and unreadable inputs
NOT_UTF8 = "client_lr: 0.1  # caf\xe9\n".encode("latin-1")


def test_a_config_file_that_is_not_utf8_is_named(tiny_overrides, capsys, tmp_path):
    (tmp_path / "mine.yaml").write_bytes(NOT_UTF8)
    assert train_lora.main(["--config", str(tmp_path / "mine.yaml"), *argv_of(tiny_overrides)]) == 2
    where = NOT_UTF8.index(0xE9)
    one_error_line(capsys.readouterr().err, f"{tmp_path / 'mine.yaml'}: not UTF-8 text (byte {where} is 0xe9)")
    assert not (tmp_path / "runs").exists()


def test_an_experiments_file_that_is_not_utf8_is_named(capsys, tmp_path):
    import run_experiments as rx

    (tmp_path / "study.yaml").write_bytes(b"experiments:\n  - config: fedavg  # \xff\n")
    assert rx.main(["--config-list", str(tmp_path / "study.yaml"), "--dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys.readouterr().err, "study.yaml: not UTF-8 text", "expected an experiments file")
    assert not (tmp_path / "out").exists()


def test_a_run_folder_whose_config_is_not_utf8_is_refused_on_resume(tiny_overrides, monkeypatch, capsys, tmp_path):
    stopped_in_round(argv_of(tiny_overrides), monkeypatch, 3)
    run_dir = tmp_path / "runs" / "run"
    saved = (run_dir / "config.yaml").read_bytes()
    (run_dir / "config.yaml").write_bytes(saved.replace(b"seed:", b"s\xffeed:"))
    capsys.readouterr()
    assert train_lora.main(["--resume", str(run_dir)]) == 2
    one_error_line(capsys.readouterr().err, f"{run_dir / 'config.yaml'}: not UTF-8 text", "the run's saved config")


def test_data_files_that_are_not_utf8_are_named(tmp_path):
    import task_fixtures

    from data import DataUnavailable, load_task

    task_fixtures.reddit(tmp_path, {"a": 2, "b": 2}, {"c": 2})
    users = tmp_path / "reddit" / "train_clients.json"
    users.write_bytes(b'["a", "\xff"]')
    with pytest.raises(DataUnavailable, match=f"{users} is not readable JSON"):
        load_task("reddit", str(tmp_path), lambda: (type("Tok", (), {"pad_token_id": 0})(), "tok"))


# ---------------------------------------------------------------- dead launchers
def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an ended child nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"{what} after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


TINY = (
    "--model tiny-bert --max-length 16 --clients 6 --server-batch 4 --server-rounds 3 --eval-freq 1 "
    "--lora-rank 4 --client-batch 32 --gpu cpu --dist-timeout 60"
).split()
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("FLASC_")}, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_torchrun_workers_end_within_seconds_of_their_killed_launcher_and_the_run_resumes(tmp_path):
    from conftest import ROOT

    args = [*TINY, "--dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")]
    ref = subprocess.run(
        [sys.executable, str(ROOT / "train_lora.py"), *args, "--name", "ref"],
        capture_output=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]
    marks = tmp_path / "pids"
    marks.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    launcher = subprocess.Popen(
        [*torchrun, str(ROOT / "tests" / "faulty_train.py"), *args, "--name", "run"],
        env={**ENV, "FLASC_CRASH_AT": "in_training:2:sleep", "FLASC_PID_DIR": str(marks)},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(list(marks.iterdir())) == 2, 120, "the ranks did not reach round 2")
        ranks = [int(p.read_text()) for p in marks.iterdir()]
        launcher.kill()  # SIGKILL: torchrun cannot pass anything on
        launcher.wait()
        took = wait_for(lambda: not any(alive(p) for p in ranks), 10, "a rank outlived its launcher")
    finally:
        launcher.kill()
    print(f"ranks gone {took:.2f} s after torchrun was SIGKILLed")
    run_dir = tmp_path / "runs" / "run"
    assert checkpoint.read(run_dir / checkpoint.FILE)["round"] == 1
    resumed = subprocess.run(
        [*torchrun, str(ROOT / "train_lora.py"), "--resume", str(run_dir)], capture_output=True, env=ENV, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]  # the lock was released
    assert without_timing(run_dir) == without_timing(tmp_path / "runs" / "ref")
    assert same_adapter(run_dir, tmp_path / "runs" / "ref")


@pytest.mark.slow
def test_a_killed_study_leaves_no_run_behind_and_a_rerun_resumes_it(tmp_path):
    from conftest import ROOT

    study = tmp_path / "study.yaml"
    overrides = {a[2:].replace("-", "_"): config.yaml_load(v) for a, v in zip(TINY[::2], TINY[1::2])}
    overrides.update(server_rounds=400, eval_freq=400, data_dir=str(tmp_path / "data"))
    study.write_text(json.dumps({"experiments": [{"config": "fedavg", "overrides": overrides}]}))
    out = tmp_path / "out"
    rx = [sys.executable, str(ROOT / "run_experiments.py"), "--config-list", str(study), "--dir", str(out)]
    proc = subprocess.Popen(rx, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dir = wait_for_run(out, 120)
        pid = int((run_dir / tracking.LOCK_FILE).read_text())
        proc.kill()
        proc.wait()
        took = wait_for(lambda: not alive(pid), 10, "the run outlived its study")
    finally:
        proc.kill()
    print(f"run gone {took:.2f} s after run_experiments.py was SIGKILLed")
    log = (out / "logs" / f"{run_dir.name}.log").read_text()
    assert "interrupted (SIGTERM) after round" in log.splitlines()[-1]  # its own last word, in its own log
    dry = subprocess.run([*rx, "--dry-run"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert dry.stdout.split()[0] == "resume", dry.stdout


def wait_for_run(out: Path, timeout: float) -> Path:
    """The study's run folder, once it has a checkpoint."""
    found = []

    def checkpointed():
        found[:] = [p.parent for p in out.glob("*/checkpoint.pt")]
        return bool(found)

    wait_for(checkpointed, timeout, "the study's run made no checkpoint")
    return found[0]


# ---------------------------------------------------------------- continuing a run to more rounds
def test_a_finished_run_extended_with_server_rounds_equals_a_run_started_with_them(tiny_overrides, tmp_path):
    """3 rounds, eval_freq 2: round 3 was evaluated only as the last; a run of 5 rounds does not
    evaluate it, so the extension takes that evaluation back out of the record."""
    assert train_lora.main(argv_of({**tiny_overrides, "name": "five", "server_rounds": 5})) == 0
    assert train_lora.main(argv_of({**tiny_overrides, "name": "three"})) == 0
    three, five = tmp_path / "runs" / "three", tmp_path / "runs" / "five"
    assert "test_accuracy" in without_timing(three)[-1]
    assert train_lora.main(["--resume", str(three), "--server-rounds", "5"]) == 0
    assert without_timing(three) == without_timing(five)
    assert same_adapter(three, five)
    ref, got = (tracking.read_json(d / "summary.json") for d in (five, three))
    assert {k: v for k, v in got.items() if "time" not in k} == {k: v for k, v in ref.items() if "time" not in k}
    assert config.yaml_load((three / "config.yaml").read_text())["server_rounds"] == 5
    assert tracking.config_name_of(three) == tracking.config_name_of(five)


def test_an_unfinished_run_extended_equals_a_run_started_with_the_new_rounds(tiny_overrides, monkeypatch, tmp_path):
    overrides = {**tiny_overrides, "eval_freq": 1}
    assert train_lora.main(argv_of({**overrides, "name": "ref", "server_rounds": 4})) == 0
    stopped_in_round(argv_of(overrides), monkeypatch, 3)
    run_dir = tmp_path / "runs" / "run"
    assert train_lora.main(["--resume", str(run_dir), "--server-rounds=4"]) == 0
    assert without_timing(run_dir) == without_timing(tmp_path / "runs" / "ref")
    assert same_adapter(run_dir, tmp_path / "runs" / "ref")


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--client-lr", "0.5"], "no other option (got --client-lr)"),
        (["--server-rounds", "2"], "--server-rounds: 2 is fewer than the 3 rounds"),
        (["--server-rounds", "many"], "server_rounds: 'many' is not valid"),
    ],
)
def test_resume_takes_server_rounds_and_nothing_else(tiny_overrides, capsys, tmp_path, extra, said):
    assert train_lora.main(argv_of(tiny_overrides)) == 0
    run_dir = tmp_path / "runs" / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_lora.main(["--resume", str(run_dir), *extra]) == 2
    one_error_line(capsys.readouterr().err, said)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing changed


def test_a_run_on_a_schedule_over_its_rounds_cannot_be_extended(tiny_overrides, capsys, tmp_path):
    assert train_lora.main(argv_of({**tiny_overrides, "server_schedule": "cosine", "server_lr": 0.5})) == 0
    capsys.readouterr()
    assert train_lora.main(["--resume", str(tmp_path / "runs" / "run"), "--server-rounds", "5"]) == 2
    one_error_line(capsys.readouterr().err, "schedule (cosine) spans server_rounds", "server_schedule: constant")


# ---------------------------------------------------------------- what a run says
def test_the_header_and_closing_line_name_the_algorithm_and_its_own_figure(stateful, capsys, tmp_path):
    assert train_lora.main(argv_of(stateful)) == 0
    err = capsys.readouterr().err
    summary = tracking.read_json(tmp_path / "runs" / "run" / "summary.json")
    assert "rounds  3 of algorithm fedsa:" in err
    done = [line for line in err.splitlines() if line.startswith("done: ")]
    assert done and done[0].startswith(
        f"done: fedsa, personal accuracy {summary['personal_accuracy_mean']:.4f} (the clients' own models; "
        f"global model's test accuracy {summary['test_accuracy']:.4f})"
    )


def test_a_typo_is_refused_before_torch_is_imported():
    """train_lora.py run as the script; sys.modules at its exit says whether torch was imported."""
    from conftest import ROOT

    probe = "\n".join(
        [
            "import runpy, sys",
            f"sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['train_lora.py', '--clinet-lr', '0.1']",
            "try:",
            f"    runpy.run_path({str(ROOT / 'train_lora.py')!r}, run_name='__main__')",
            "except SystemExit as e:",
            "    print('exit', e.code, 'torch' in sys.modules)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == ["exit", "2", "False"], done.stdout + done.stderr
    assert "unknown option 'clinet_lr'" in done.stderr


# ---------------------------------------------------------------- checkpoints of earlier versions, races
def as_written_before_issue_23(run_dir: Path) -> None:
    """Rewrite the run's checkpoint as flasc wrote it before these checks: no digests of client
    states or metrics, no server_rounds of its own (in its fingerprint instead), no eval_keys."""
    state = checkpoint.read(run_dir / checkpoint.FILE)
    cfg = config.from_mapping(config.yaml_load((run_dir / "config.yaml").read_text()))
    for key in ("server_rounds", "metrics_digest", "format"):
        state.pop(key, None)
    states = state["federation"].get("client_states")
    if states is not None:
        states.pop("digests"), states.pop("checked")
    state["progress"].pop("eval_keys")
    state["config_fingerprint"] = checkpoint.config_fingerprint(cfg, outside=("dir", "name"))
    (run_dir / checkpoint.FILE).write_bytes(checkpoint.encode(state))


def test_a_checkpoint_of_an_earlier_version_resumes_twice_and_extends(stateful, monkeypatch, tmp_path):
    """Its client states have no digests: read unchecked, and saved again as unchecked (not as a
    digest of 0 that the next resume would call damaged)."""
    overrides = {**stateful, "server_rounds": 5}
    assert train_lora.main(argv_of({**overrides, "name": "ref", "server_rounds": 6})) == 0
    stopped_in_round(argv_of(overrides), monkeypatch, 3)
    run_dir = tmp_path / "runs" / "run"
    as_written_before_issue_23(run_dir)
    stopped_in_round(["--resume", str(run_dir), "--server-rounds", "6"], monkeypatch, 4)  # extended, checkpointed
    assert train_lora.main(["--resume", str(run_dir)]) == 0
    assert without_timing(run_dir) == without_timing(tmp_path / "runs" / "ref")


def test_processes_writing_one_file_at_once_never_share_a_temporary_file(tmp_path):
    import threading

    from flasc.runtime import files

    errors = []

    def write(n):
        for i in range(200):
            try:
                files.write_atomic(tmp_path / "cache.pt", f"{n}:{i}".encode() * 100)
            except files.WriteFailed as e:
                errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]
    text = (tmp_path / "cache.pt").read_text()
    assert text == text[: len(text) // 100] * 100  # one writer's whole content


@pytest.mark.parametrize("stop", ["before_the_record_changes", "after_it"])
def test_a_continuation_stopped_half_way_resumes_to_the_same_run(tiny_overrides, monkeypatch, tmp_path, stop):
    """--server-rounds 5 on a finished 3-round run undoes round 3's evaluation; a stop just before
    metrics.jsonl changes (its checkpoint says how) or just after it, then a plain --resume, ends
    like a run started with 5 rounds."""
    from flasc.runtime import files

    assert train_lora.main(argv_of({**tiny_overrides, "name": "five", "server_rounds": 5})) == 0
    assert train_lora.main(argv_of(tiny_overrides)) == 0
    run_dir = tmp_path / "runs" / "run"
    if stop == "before_the_record_changes":

        def disk_full(self, redo):
            raise files.WriteFailed(self.dir / "metrics.jsonl", "No space left on device")

        monkeypatch.setattr(tracking.RunLog, "apply_redo", disk_full)
        assert train_lora.main(["--resume", str(run_dir), "--server-rounds", "5"]) == 4
        monkeypatch.undo()
        monkeypatch.setitem(data.DATASETS, "toy", toy_spec())
    else:
        stopped_in_round(["--resume", str(run_dir), "--server-rounds", "5"], monkeypatch, 4)
    assert checkpoint.read(run_dir / checkpoint.FILE).get("metrics_redo")
    assert train_lora.main(["--resume", str(run_dir)]) == 0
    assert without_timing(run_dir) == without_timing(tmp_path / "runs" / "five")
    assert same_adapter(run_dir, tmp_path / "runs" / "five")
