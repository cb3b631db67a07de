"""Studies on a cluster (flasc/studies/launchers.py): a tiny study under the SLURM launcher (submitit's local
executor) and the Ray launcher (a Ray instance started here) gives the results table the local
launcher gives; a preempted SLURM job resumes and ends as the uninterrupted run."""

import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

import run_experiments as rx
from flasc.studies import launchers as cluster

for _package in ("submitit", "ray"):  # imported at collection, outside any test's captured output:
    try:  # their logging keeps the stream it finds when first imported
        __import__(_package)
    except ImportError:
        pass

TIMING = {"s/round", "wall s"}
# The local launcher gives one run at a time every core's thread; the cluster runs get as many, so
# that the numbers are bit-identical (another thread count changes float rounding).
THREADS = str(os.cpu_count() or 1)


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    """Two tiny runs (seeds 0 and 1) on the embedded corpus; the subprocesses have no toy data set."""
    root = tmp_path_factory.mktemp("study")
    study = {
        "seeds": [0, 1],
        "defaults": {
            "model": "tiny-bert",
            "max_length": 16,
            "clients": 6,
            "server_batch": 2,
            "server_rounds": 2,
            "eval_freq": 1,
            "lora_rank": 4,
            "client_batch": 32,
            "gpu": "cpu",
            "data_dir": str(root / "data"),
        },
        "experiments": [{"config": "fedavg"}],
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def table(folder) -> list[dict]:
    with open(folder / "results.csv") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    return [{k: v for k, v in zip(header, row) if not any(k.startswith(t) for t in TIMING)} for row in rows[1:]]


def without_timing(run_dir) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in lines]


@pytest.mark.slow
def test_slurm_and_ray_launchers_give_the_local_table(study_file, tmp_path):
    pytest.importorskip("submitit")
    pytest.importorskip("ray")
    # one seed of the study: each launcher's runs are subprocesses, the lion's share of CI's time
    study = yaml.safe_load(study_file.read_text())
    study["seeds"] = [0]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    base = ["--config-list", str(tmp_path / "study.yaml")]
    assert rx.main([*base, "--dir", str(tmp_path / "local"), "--jobs", "1"]) == 0
    assert (
        rx.main(
            [*base, "--dir", str(tmp_path / "slurm"), "--launcher", "slurm", "--slurm-local", "--cpus-per-run", THREADS]
        )
        == 0
    )
    assert rx.main([*base, "--dir", str(tmp_path / "ray"), "--launcher", "ray", "--cpus-per-run", THREADS]) == 0
    local = table(tmp_path / "local")
    assert len(local) == 1 and local[0]["seeds"] == "1"
    assert table(tmp_path / "slurm") == local and table(tmp_path / "ray") == local
    for launcher in ("slurm", "ray"):  # the run itself, not only the table
        run = "fedavg-seed0"
        assert without_timing(tmp_path / launcher / run) == without_timing(tmp_path / "local" / run)
    # a second time, everything is finished: nothing is submitted
    assert rx.main([*base, "--dir", str(tmp_path / "slurm"), "--launcher", "slurm", "--slurm-local"]) == 0
    assert not any("resume" in p.read_text() for p in (tmp_path / "slurm" / "logs").iterdir())


@pytest.mark.slow
def test_a_preempted_slurm_job_resumes_to_the_uninterrupted_run(study_file, tmp_path):
    pytest.importorskip("submitit")
    study = yaml.safe_load(study_file.read_text())
    study["seeds"] = [0]
    study["defaults"].update(server_rounds=16, ckpt_freq=1, eval_freq=4)  # about 8 s
    spec = rx.expand(study, str(tmp_path / "slurm"))[0]
    uninterrupted = rx.expand(study, str(tmp_path / "local"))
    assert rx.run_all(uninterrupted, tmp_path / "local", 1)[spec.name] == "ok"

    launcher = cluster.SlurmLauncher(cluster.Resources(cpus=int(THREADS)), local=True)
    job = launcher.submit([spec], tmp_path / "slurm")[0]
    metrics = tmp_path / "slurm" / spec.name / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # mid-way, checkpointed
        assert time.time() < deadline and not job.done(), "the job did not get going"
        time.sleep(0.2)
    # SLURM signals the job (USR2, submitit's preemption signal) before it preempts it or at its time
    # limit: here the job's process, the parent of the train_lora.py whose pid the run folder's lock holds
    pid = int((tmp_path / "slurm" / spec.name / ".lock").read_text())
    job_process = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(job_process, signal.SIGUSR2)
    assert cluster.wait_all({spec.name: job}, cluster._submitit_outcome)[spec.name] == "ok"
    log = (tmp_path / "slurm" / "logs" / f"{spec.name}.log").read_text()
    assert "resumed" in log  # it really stopped and came back
    assert without_timing(tmp_path / "slurm" / spec.name) == without_timing(tmp_path / "local" / spec.name)


@pytest.mark.slow
def test_a_failing_run_is_isolated_on_the_cluster(study_file, tmp_path, capsys):
    """One run of two fails (its tokenizer folder does not exist): the other finishes and is
    tabulated, the failure is listed with its log, the study exits 1."""
    pytest.importorskip("submitit")
    study = yaml.safe_load(study_file.read_text())
    study["seeds"] = [0]
    study["experiments"].append(
        {"config": "fedavg", "name": "broken", "overrides": {"model_path": str(tmp_path / "none")}}
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert (
        rx.main(["--config-list", str(path), "--dir", str(tmp_path / "out"), "--launcher", "slurm", "--slurm-local"])
        == 1
    )
    out = capsys.readouterr().out
    assert "1 ran, 0 skipped, 0 diverged, 1 failed" in out
    assert f"broken-seed0: failed (exit 2): see {tmp_path / 'out' / 'logs' / 'broken-seed0.log'}" in out
    assert [r["run"] for r in table(tmp_path / "out")] == ["fedavg"]
    assert "could not be loaded" in (tmp_path / "out" / "logs" / "broken-seed0.log").read_text()


def test_a_missing_package_is_one_line(study_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)
    monkeypatch.setitem(sys.modules, "ray", None)
    for launcher, package in (("slurm", "submitit"), ("ray", "ray")):
        assert rx.main(["--config-list", str(study_file), "--dir", str(tmp_path), "--launcher", launcher]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: --launcher {launcher} needs the package {package}: pip install -r requirements-cluster.txt"
        ]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--slurm-partition", "gpu"], "--slurm-partition is for a cluster launcher"),
        (["--launcher", "ray", "--slurm-account", "lab"], "--slurm-account: sbatch options are for --launcher slurm"),
        (["--launcher", "slurm", "--slurm-account"], "--slurm-account needs a value"),
        (["--launcher", "slurm", "--gpus-per-run", "-1"], "--gpus-per-run: expected a number >= 0"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--launcher", "slurm", "--slurm-walltime", "1"], "--slurm-walltime: not an sbatch option submitit passes on"),
        (["--launcher", "slurm", "--slurm-time", "60"], "--slurm-time: set by the study itself; use --timeout-min"),
    ],
)
def test_bad_cluster_options_are_one_line(study_file, tmp_path, capsys, args, words):
    pytest.importorskip("submitit")
    pytest.importorskip("ray")
    assert rx.main(["--config-list", str(study_file), "--dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_slurm_without_slurm_is_one_line(study_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    assert rx.main(["--config-list", str(study_file), "--dir", str(tmp_path / "out"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --launcher slurm: no SLURM on this machine (sbatch not found); run the study on the "
        "cluster's login node, or add --slurm-local to run its jobs here"
    ]
    assert not (tmp_path / "out").exists()


def test_a_run_with_several_gpus_is_launched_with_torchrun(study_file, tmp_path):
    spec = rx.expand(yaml.safe_load(study_file.read_text()), str(tmp_path))[0]
    one = rx.command(spec, "fresh", tmp_path)
    four = rx.command(spec, "resume", tmp_path, procs=4)
    assert one[1:2] == [str(rx.ROOT / "train_lora.py")]
    assert four[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert four[6:] == [str(rx.ROOT / "train_lora.py"), "--resume", str(tmp_path / spec.name)]


def test_dry_run_says_where_the_runs_would_go(study_file, tmp_path, capsys):
    pytest.importorskip("submitit")
    assert (
        rx.main(
            [
                "--config-list",
                str(study_file),
                "--dir",
                str(tmp_path),
                "--launcher",
                "slurm",
                "--slurm-partition",
                "gpu",
                "--gpus-per-run",
                "2",
                "--slurm-account",
                "lab",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 runs, one job per run on SLURM partition gpu: 2 GPU(s), 2 CPUs, 240 min per job, --account lab" in out
    assert not (tmp_path / "slurm").exists()
