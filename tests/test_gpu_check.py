"""bench/gpu_check.py on the CPU (CI has no GPU): the script runs end to end, and its comparison
flags what it must flag."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_reports_every_part(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "FLASC_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--shapes",
            "tiny",
            "--configs",
            "fedavg,paper/cifar10_flasc_d64",
            "--timing-rounds",
            "1",
            "--timing-clients",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON report"))["rows"]
    correctness = {r["name"]: r for r in rows if r["check"] == "correctness"}
    assert set(correctness) == {"fedavg", "paper/cifar10_flasc_d64"}
    # the CPU twice: one seed gives the same numbers, so the "device" run equals the reference exactly
    assert all(r["status"] == "ok" and r["max_rel_diff"] == 0.0 for r in correctness.values())
    assert [r["name"] for r in rows if r["check"] == "determinism"] == ["fedavg"]
    # one client at a time and three at a time, dropout on: the same run to float rounding
    together = [r for r in rows if r["check"] == "together"]
    assert [r["name"] for r in together] == ["fedavg"] and together[0]["status"] == "ok"
    assert together[0]["max_rel_diff"] <= 1e-5
    speed = {r["name"]: r for r in rows if r["check"] == "speed"}
    assert set(speed) == {f"tiny-{m}, {p}" for m in ("bert", "gpt2", "vit") for p in ("fp32", "bf16")}
    # tiny-bert with LoRA rank 16 on query/value of 2 layers (hidden 32) and a 5-label head:
    # 2 layers x 2 modules x (16x32 + 32x16) + (32x5 + 5)
    assert speed["tiny-bert, fp32"]["trainable"] == 2 * 2 * (16 * 32 + 32 * 16) + 32 * 5 + 5
    for r in speed.values():
        assert r["client_updates_per_s"] > 0 and r["peak_gpu_gib"] is None  # no GPU memory on the CPU
        assert math.isclose(r["examples_per_s"], 80 * r["client_updates_per_s"])
        assert math.isclose(r["client_updates_per_s"] * r["round_s"], 2)  # --timing-clients 2
    assert "| correctness | paper/cifar10_flasc_d64 | ok |" in proc.stdout


def test_comparison_flags_losses_and_servers_beyond_the_tolerance():
    ref = [{"round": 1, "train_loss": 2.0, "val_loss": 1.0, "val_accuracy": 0.5}]
    server = torch.ones(100)
    close = [{"round": 1, "train_loss": 2.0 * (1 + 5e-4), "val_loss": 1.0, "val_accuracy": 0.4}]
    worst, problems = gpu_check.compare(ref, close, server, server * (1 + 5e-4))
    assert problems == [] and math.isclose(worst, 5e-4, rel_tol=1e-3)
    far = [{"round": 1, "train_loss": 2.1, "val_loss": float("nan"), "val_accuracy": 0.5}]
    worst, problems = gpu_check.compare(ref, far, server, server * 1.01)
    assert len(problems) == 3  # train_loss off by 5%, val_loss NaN, the server 1% away
    assert any("val_loss" in p for p in problems) and any("server" in p for p in problems)
    assert gpu_check.finite([{"round": 2, "test_loss": float("inf"), "seconds": float("nan")}]) == [
        "round 2 test_loss=inf"
    ]
