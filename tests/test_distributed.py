"""One run over several processes (torchrun, gloo on the CPU): the same results as one process,
rank 0 alone writing, a failing rank ending every rank, and resuming under torchrun."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import config
import train_lora
from flasc.runtime.distributed import balanced_shares

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# one thread a process everywhere: what is compared is the world size, not the thread count
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("FLASC_")},
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def test_balanced_shares_by_hand():
    # largest first to the least loaded: 9 -> rank 0, 7 -> 1, 5 -> 1 (7 < 9), 4 -> 0 (9 < 12), 3 -> 1 (12 < 13)
    assert balanced_shares([9, 7, 5, 4, 3], 2) == [[0, 3], [1, 2, 4]]
    assert balanced_shares([5, 5, 5], 2) == [[0, 2], [1]]  # ties go to the lower rank
    assert balanced_shares([3, 1], 4) == [[0], [1], [], []]  # more ranks than clients
    shares = balanced_shares(list(range(1, 30)), 3)
    assert sorted(i for s in shares for i in s) == list(range(29))  # each client exactly once


def test_backend_and_device_per_rank(monkeypatch):
    from flasc.runtime.distributed import backend_for

    assert backend_for(torch.device("cpu"), 2, True) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert backend_for(torch.device("cuda", 1), 2, True) == "nccl"  # a GPU for each rank
    assert backend_for(torch.device("cuda", 1), 4, True) == "gloo"  # 4 ranks share 2 GPUs
    assert backend_for(torch.device("cuda", 0), 2, False) == "gloo"  # gpu: 0 pins every rank to one GPU
    assert train_lora.pick_device("auto", 3) == torch.device("cuda", 1)
    assert train_lora.pick_device("0", 3) == torch.device("cuda", 0)
    with pytest.raises(config.ConfigError, match="dist_timeout: "):
        config.load_config(overrides={"dist_timeout": 0})


def without_timing(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in lines]


def assert_same_run(a, b):
    assert without_timing(a) == without_timing(b)
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k != "wall_time_s"} == {k: v for k, v in sb.items() if k != "wall_time_s"}


SETTINGS = {  # name -> overrides on the tiny toy run; eval_batch 8 spreads evaluation over both ranks
    "average": {"dl_density": 0.5, "ul_density": 0.5},
    "ties_product": {"merging_strategy": "ties", "merge_space": "product", "density": 0.5},
    "fisher": {"merging_strategy": "fisher", "fisher_examples": 4},
    "regmean": {"merging_strategy": "regmean", "regmean_examples": 8},
    "tiers": {"tiers": 2, "syshet": "rankl1", "tier_assignment": "random"},
    "dp_noise": {"noise_multiplier": 0.5, "l2_clip_norm": 0.5},
    # client states read by rank 0 and sent to the rank that trains the client; personal evaluation
    "fedsa": {"algorithm": "fedsa", "eval_personalized": True, "server_rounds": 4},
    "scaffold": {"algorithm": "scaffold", "server_rounds": 4},
    "fedex": {"algorithm": "fedex"},
    "hetlora_tiers": {"algorithm": "hetlora", "tiers": 2, "hetlora_prune": True},
    "rolora_tiers": {"algorithm": "rolora", "tiers": 2, "syshet": "rank"},  # B, then A
    "fedsvd_dp": {"algorithm": "fedsvd", "noise_multiplier": 0.5, "l2_clip_norm": 0.5},
    "lorafair": {"algorithm": "lorafair"},
    "fedsb_dp": {"algorithm": "fedsb", "noise_multiplier": 0.5, "l2_clip_norm": 0.5},  # factors from rank 0
}


@pytest.mark.slow
def test_world_size_two_equals_one_for_every_strategy(tiny_overrides, tmp_path, model_folders):
    settings = {**SETTINGS, "llama": {"model": str(model_folders["llama"]), "algorithm": "fedsa"}}
    if importlib.util.find_spec("bitsandbytes") is not None:
        settings["llama_4bit"] = {"model": str(model_folders["llama"]), "quantization": "4bit"}
    from test_instructions import topic_rows, write_jsonl
    from test_llm_eval import QUESTIONS

    settings["instructions"] = {  # local steps with accumulation; its scoring task sharded over the ranks
        "dataset": "instructions",
        "data_files": write_jsonl(tmp_path / "train.jsonl", topic_rows(60)),
        "model": str(model_folders["llama"]),
        "max_length": 48,
        "client_steps": 2,
        "grad_accum": 2,
        "client_opt": "adamw",
        "llm_tasks": [write_jsonl(tmp_path / "topics.jsonl", QUESTIONS)],
    }
    specs = [
        {**tiny_overrides, "server_batch": 4, "eval_batch": 8, "name": name, **extra}
        for name, extra in settings.items()
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec in specs:  # world size 1, in this process
            train_lora.train(config.load_config(overrides={**spec, "dir": str(tmp_path / "one")}))
    finally:
        torch.set_num_threads(threads)
    spec_file = tmp_path / "specs.json"
    spec_file.write_text(json.dumps([{**spec, "dir": str(tmp_path / "two")} for spec in specs]))
    proc = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "dist_runner.py"), str(spec_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone wrote: one folder per run (rank 1 would have made NAME-1), the same files as one process
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(settings)
    for name in settings:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
        assert_same_run(one, two)


# The remaining tests run train_lora.py itself (the toy task exists only inside pytest): the embedded
# corpus with a tiny model, as tests/test_resume.py does.
BASE = (
    "--model tiny-bert --max-length 16 --clients 6 --server-batch 4 --server-rounds 3 "
    "--eval-freq 3 --lora-rank 4 --client-batch 32 --gpu cpu --dl-density 0.5 --ul-density 0.5 "
    "--dist-timeout 60"
).split()


def launch(tmp_path, args, launcher, **env):
    """train_lora.py under `launcher`; with FLASC_CRASH_AT in env, tests/faulty_train.py (which wraps it)."""
    script = ROOT / "tests" / "faulty_train.py" if "FLASC_CRASH_AT" in env else ROOT / "train_lora.py"
    return subprocess.run(
        [*launcher, str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**ENV, **env}
    )


@pytest.mark.slow
def test_failing_rank_ends_every_rank_and_the_run_resumes_under_torchrun(tmp_path):
    args = [*BASE, "--dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")]
    reference = launch(tmp_path, [*args, "--name", "ref"], [sys.executable])
    assert reference.returncode == 0, reference.stderr

    failed = launch(
        tmp_path, [*args, "--name", "run"], TORCHRUN, FLASC_CRASH_AT="mid_round:2:raise", FLASC_CRASH_RANK="1"
    )
    assert failed.returncode != 0
    lines = [x for x in failed.stderr.splitlines() if x.startswith("error:")]
    assert lines == ["error: rank 1 failed: RuntimeError: injected failure at mid_round of round 2"]
    run_dir = tmp_path / "runs" / "run"
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoint.pt").exists()

    resumed = launch(tmp_path, ["--resume", str(run_dir)], TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, tmp_path / "runs" / "ref")  # and world size 2 equals world size 1


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_without_waiting_for_the_timeout(tmp_path):
    args = [*BASE, "--dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--name", "run"]
    t0 = time.monotonic()
    killed = launch(tmp_path, args, TORCHRUN, FLASC_CRASH_AT="mid_round:2", FLASC_CRASH_RANK="1")
    assert killed.returncode != 0
    assert time.monotonic() - t0 < 60  # dist_timeout is 60 s: nobody waited for it
    assert not (tmp_path / "runs" / "run" / "summary.json").exists()


@pytest.mark.slow
def test_bad_input_under_torchrun_is_said_once(tmp_path):
    proc = launch(tmp_path, ["--lora-rank", "x"], TORCHRUN)
    assert proc.returncode != 0
    said = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: lora_rank: ")


def test_each_rank_is_sent_only_the_states_of_the_clients_it_trains(tiny_overrides, tmp_path):
    """Stateful algorithms under torchrun: rank 0 reads the sampled clients' states and sends each
    rank those of its own share (not every state to every rank)."""
    from flasc.runtime import distributed

    cfg = config.load_config(overrides={**tiny_overrides, "algorithm": "fedsa", "server_batch": 5})
    fed = train_lora.build(cfg, torch.device("cpu"))
    fed.attach_store(tmp_path)
    for c in range(cfg.clients):
        fed.store.put(c, torch.full((fed.algorithm.state_numel,), float(c)))
    sent = []

    class RankZeroOfTwo(distributed.World):  # the exchange replaced by a record of what it would send
        def scatter_from_main(self, make):
            parts = make()
            sent.extend(parts)
            return parts[self.rank]

    fed.world = RankZeroOfTwo(rank=0, size=2)
    plan = fed.plan_round(0)
    shares = balanced_shares([len(fed.clients[j.client_id]) for j in plan.jobs], 2)
    expected = [sorted(plan.jobs[i].client_id for i in share) for share in shares]
    assert [sorted(part) for part in sent] == expected and all(expected)
    assert all(torch.equal(state, torch.full_like(state, float(c))) for part in sent for c, state in part.items())
    local = fed.algorithm.local
    for job in plan.jobs:  # rank 0's own clients start from their states; the others' are not here
        own = job.client_id in expected[0]
        assert torch.equal(job.start[local], torch.full_like(job.start[local], float(job.client_id))) == own
