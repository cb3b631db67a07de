"""Kill-and-resume: a run killed (SIGKILL) at any point and resumed ends exactly like an
uninterrupted run with the same seed."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from flasc.runtime import checkpoint

pytestmark = pytest.mark.slow  # every test here runs train_lora.py in subprocesses

# The toy task exists only inside pytest; subprocesses use the real embedded corpus with a tiny
# model and short texts, which is still only a few seconds a run.
BASE = (
    "--model tiny-bert --max-length 16 --clients 6 --server-batch 2 --server-rounds 4 "
    "--eval-freq 2 --lora-rank 4 --client-batch 32 --gpu cpu --dl-density 0.5 --ul-density 0.5 "
    "--server-opt adam --server-lr 0.01"
).split()


def train(tmp_path, name, *extra, crash=None, resume=None, base=BASE):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FLASC_CRASH_AT", None)
    if crash:
        env["FLASC_CRASH_AT"] = crash
    args = (
        ["--resume", str(resume)]
        if resume
        else [*base, *extra, "--dir", str(tmp_path / "runs"), "--name", name, "--data-dir", str(tmp_path / "data")]
    )
    return subprocess.run(
        [sys.executable, str(entry(crash)), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )


def entry(crash) -> object:
    """train_lora.py, or with a crash to inject tests/faulty_train.py, which wraps it."""
    return ROOT / "tests" / "faulty_train.py" if crash else ROOT / "train_lora.py"


def without_timing(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in lines]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run killed after logging round 3 (its checkpoint of round 3 kept), made once: tests that
    damage or edit it work on their own copy (killed_copy)."""
    tmp = tmp_path_factory.mktemp("killed")
    assert train(tmp, "run", crash="after_log:3").returncode == -9
    return tmp / "runs" / "run"


def killed_copy(killed_run, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(killed_run, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    proc = train(tmp, "ref")
    assert proc.returncode == 0, proc.stderr
    return tmp / "runs" / "ref"


# after a round's log line and during a later checkpoint write: the stateful runs below die there
@pytest.mark.parametrize("crash", ["mid_round:3", "checkpoint_write:2"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, reference, crash):
    killed = train(tmp_path, "run", crash=crash)
    assert killed.returncode == -9  # it really died mid-way
    run_dir = tmp_path / "runs" / "run"
    assert not (run_dir / "summary.json").exists()
    resumed = train(tmp_path, "run", resume=run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timing(run_dir) == without_timing(reference)
    a = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert {k: v for k, v in sa.items() if k != "wall_time_s"} == {k: v for k, v in sb.items() if k != "wall_time_s"}


def test_resuming_a_finished_run_does_nothing(reference, tmp_path):
    before = (reference / "metrics.jsonl").read_text()
    proc = train(tmp_path, "x", resume=reference)
    assert proc.returncode == 0 and "finished already" in proc.stdout
    assert (reference / "metrics.jsonl").read_text() == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, killed_run):
    run_dir = killed_copy(killed_run, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = train(tmp_path, "run", resume=run_dir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in proc.stderr


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, killed_run):
    run_dir = killed_copy(killed_run, tmp_path)
    cfg = (run_dir / "config.yaml").read_text().replace("client_lr: 0.05", "client_lr: 0.07")
    (run_dir / "config.yaml").write_text(cfg)
    proc = train(tmp_path, "run", resume=run_dir)
    assert proc.returncode == 2 and "another configuration" in proc.stderr


def test_run_made_before_an_option_existed_resumes(tmp_path, reference, killed_run):
    """A run started by a flasc without an option (its config.yaml and checkpoint fingerprint do not
    have it) resumes with the option at its default, and ends as the uninterrupted run."""
    import config

    run_dir = killed_copy(killed_run, tmp_path)
    saved = config.yaml_load((run_dir / "config.yaml").read_text())
    older = {k: v for k, v in saved.items() if k != "client_parallelism"}
    assert len(older) == len(saved) - 1
    (run_dir / "config.yaml").write_text(config.dump(older))
    state = checkpoint.read(run_dir / "checkpoint.pt")
    state["config_fingerprint"] = checkpoint.config_fingerprint(older)
    checkpoint.save(run_dir, state)
    resumed = train(tmp_path, "run", resume=run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timing(run_dir) == without_timing(reference)


def test_resume_needs_a_run_folder_and_nothing_else(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_lora.py"), "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no config.yaml" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_lora.py"), "--resume", str(tmp_path), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no other option" in proc.stderr


def test_augmented_image_run_resumes_exactly(tmp_path):
    """Random crops and flips draw from the per-client seeded generator, so a resumed CIFAR-10 run
    repeats the uninterrupted one."""
    import task_fixtures

    task_fixtures.cifar10(tmp_path / "data", per_batch=4, n_test=4)
    extra = (
        "--dataset cifar10 --model tiny-vit --clients 3 --server-batch 2 --server-rounds 3 "
        "--eval-freq 1 --lora-rank 2 --client-batch 4 --eval-batch 8 --gpu cpu"
    ).split()

    def image_run(name, crash=None, resume=None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLASC_OFFLINE": "1"}
        env.pop("FLASC_CRASH_AT", None)
        if crash:
            env["FLASC_CRASH_AT"] = crash
        args = (
            ["--resume", str(resume)]
            if resume
            else [*extra, "--dir", str(tmp_path / "runs"), "--name", name, "--data-dir", str(tmp_path / "data")]
        )
        return subprocess.run(
            [sys.executable, str(entry(crash)), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    assert image_run("ref").returncode == 0
    assert image_run("run", crash="after_log:2").returncode == -9
    resumed = image_run("run", resume=tmp_path / "runs" / "run")
    assert resumed.returncode == 0, resumed.stderr
    assert without_timing(tmp_path / "runs" / "run") == without_timing(tmp_path / "runs" / "ref")


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_interrupted_run_saves_its_last_round_and_says_how_to_resume(tmp_path, reference, signum, code):
    """SIGINT / SIGTERM with no checkpoint written yet (ckpt_freq 0): the run checkpoints the last
    completed round, prints the --resume command in one line, and the resumed run equals the
    uninterrupted one."""
    import re
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FLASC_CRASH_AT", None)
    run_dir = tmp_path / "runs" / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train_lora.py"),
            *BASE,
            "--ckpt-freq",
            "0",
            "--server-rounds",
            "4",
            "--dir",
            str(tmp_path / "runs"),
            "--name",
            "run",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert sum(line.startswith("interrupted (") for line in err.splitlines()) == 1, err[-2000:]  # said once
    match = re.fullmatch(
        rf"interrupted \(SIG(INT|TERM)\) after round (\d) of 4; resume with: "
        rf"python train_lora.py --resume {re.escape(str(run_dir))}",
        last,
    )
    assert match, last
    rounds = int(match.group(2))
    assert checkpoint.read(run_dir / "checkpoint.pt")["round"] == rounds
    assert len(without_timing(run_dir)) >= rounds
    resumed = train(tmp_path, "run", resume=run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timing(run_dir) == without_timing(reference)


STATEFUL = (
    "--model tiny-bert --max-length 16 --clients 3 --server-batch 2 --server-rounds 4 "
    "--eval-freq 2 --lora-rank 4 --client-batch 32 --gpu cpu --eval-personalized true"
).split()


def instruction_base(tmp_path, model_folders) -> list[str]:
    """STATEFUL on dataset instructions: a tiny Llama, local steps with accumulation, AdamW."""
    from test_instructions import topic_rows, write_jsonl

    files = write_jsonl(tmp_path / "train.jsonl", topic_rows(60))
    return [
        *("--dataset instructions --max-length 48 --client-steps 3 --grad-accum 2 --client-batch 4".split()),
        *("--client-opt adamw --client-lr 0.01 --client-schedule cosine --client-lr-min 0.001".split()),
        *("--clients 3 --server-batch 2 --server-rounds 4 --eval-freq 2 --lora-rank 4 --gpu cpu".split()),
        *("--eval-personalized true".split()),
        *("--data-files", files, "--model", str(model_folders["llama"])),
    ]


@pytest.mark.parametrize(
    "algorithm, crash, ckpt_freq, task",
    [
        ("fedsa", "mid_round:4", 2, "instructions"),
        ("scaffold", "after_log:3", 1, "bbcnews"),
        ("fedex", "checkpoint_write:2", 1, "bbcnews"),
    ],
)
def test_stateful_algorithm_resumes_exactly(tmp_path, model_folders, algorithm, crash, ckpt_freq, task):
    """Client states (FedSA's B and head, SCAFFOLD's c_i), the server's extras (c, the base delta)
    survive a kill: 3 clients, 2 a round, so clients train again between checkpoints (fedsa
    checkpoints every 2 rounds and dies in round 4, after round 3 rewrote some states; it runs
    on an instruction task, whose local steps, accumulation and client lr schedule resume too)."""
    args = ["--algorithm", algorithm, "--ckpt-freq", str(ckpt_freq)]
    base = instruction_base(tmp_path, model_folders) if task == "instructions" else STATEFUL

    def run(name, crash=None, resume=None):
        return train(tmp_path, name, *args, crash=crash, resume=resume, base=base)

    assert run("ref").returncode == 0
    assert run("run", crash=crash).returncode == -9
    resumed = run("run", resume=tmp_path / "runs" / "run")
    assert resumed.returncode == 0, resumed.stderr
    ref, got = tmp_path / "runs" / "ref", tmp_path / "runs" / "run"
    assert without_timing(got) == without_timing(ref)
    assert "personal_accuracy_mean" in without_timing(ref)[-1]
    for name in ["adapter_model.safetensors"]:
        a, b = load_file(got / "adapter" / name), load_file(ref / "adapter" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    if algorithm == "fedex":
        a, b = (torch.load(d / "adapter" / "base_delta.pt") for d in (got, ref))
        assert all(torch.equal(a[k], b[k]) for k in a) and any(bool(v.any()) for v in a.values())
