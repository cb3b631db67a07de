"""What the screen, the study table and the plots say (issue 11, item 7)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import config
import plot
import run_experiments as rx
import train_lora
from flasc.runtime import tracking


def test_progress_moves_within_a_round(tiny_overrides, monkeypatch):
    cfg = config.load_config(overrides={**tiny_overrides, "server_batch": 3})
    fed = train_lora.build(cfg, torch.device("cpu"))
    events, real = [], fed.worker.train_client

    def counting(rnd, client, start, grad_mask, extras):
        events.append(("train", client))
        return real(rnd, client, start, grad_mask, extras)

    monkeypatch.setattr(fed.worker, "train_client", counting)
    fed.on_client = lambda rnd, k, n: events.append(("progress", rnd, k, n))
    fed.run_round(1)
    progress = [e for e in events if e[0] == "progress"]
    assert progress == [("progress", 1, k, 3) for k in (1, 2, 3)]
    assert [e[0] for e in events] == ["progress", "train"] * 3  # announced before each client trains


def test_the_start_is_a_short_header_and_the_full_config_goes_to_the_files(tiny_overrides, capsys):
    argv = [f"--{k}={config.yaml_value(v)}" for k, v in {**tiny_overrides, "server_rounds": 1}.items()]
    assert train_lora.main(["--config", "flasc", *argv]) == 0
    err = capsys.readouterr().err
    run_dir = config.Path(tiny_overrides["dir"]) / "run"
    header = err.split("partition:")[0].strip().splitlines()
    assert len(header) == 4 and header[0].startswith(f"run     {run_dir}")
    assert header[1].startswith("model   tiny-bert, LoRA rank 4: ")
    assert "client_lr" not in err  # no config dump on the screen
    assert "client_lr: 0.1" in (run_dir / "train.log").read_text()
    assert (run_dir / "config.yaml").read_text().startswith("# --config flasc\n")
    assert tracking.config_name_of(run_dir) == "flasc"


def test_study_table_shows_every_option_off_its_default(tmp_path):
    specs = rx.expand(
        {"experiments": [{"config": "flasc", "overrides": {"client_lr": 0.1, "mu": [0.0, 0.01]}}]}, str(tmp_path)
    )
    options = [rx.options_off_default(s.resolved) for s in specs]
    assert options[0] == {"client_lr": 0.1}  # mu 0 is the default
    assert options[1] == {"client_lr": 0.1, "mu": 0.01}  # densities have their own column


def test_plot_labels_name_the_config_and_what_changed_on_top_of_it():
    flasc = dict(config.load_config("flasc", {"client_lr": 0.2, "seed": 3}))
    plain = dict(config.load_config())
    runs = [
        {"config": flasc, "config_name": "flasc"},
        {"config": plain, "config_name": None},
        {"config": dict(config.load_config("fedavg")), "config_name": "fedavg"},
    ]
    plot.label_runs(runs)
    assert [r["label"] for r in runs] == ["flasc (client_lr=0.2)", "defaults", "fedavg"]


@pytest.mark.slow
def test_run_sh_skips_only_a_finished_run_of_the_same_config(tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "DIR": str(tmp_path),
        "ROUNDS": "2",
        "SEEDS": "0",
        "SERVER_OPTS": "sgd",
        "CLIENT_OPTS": "sgd",
        "EPOCHS": "1",
        "STRATEGIES": "average ties",
        "PYTHON": sys.executable,
    }
    same = config.load_config(
        overrides={
            "server_opt": "sgd",
            "server_lr": 1.0,
            "client_opt": "sgd",
            "client_lr": 0.05,
            "client_epochs": 1,
            "merging_strategy": "average",
            "server_rounds": 2,
            "seed": 0,
            "dir": str(tmp_path),
            "name": "sgd-sgd-e1-average-seed0",
        }
    )
    other = config.Config({**same, "merging_strategy": "ties", "server_rounds": 5, "name": "sgd-sgd-e1-ties-seed0"})
    for cfg in (same, other):  # two finished runs; the second was made with other rounds
        folder = tmp_path / cfg.name
        folder.mkdir()
        (folder / "config.yaml").write_text(config.dump(cfg))
        (folder / "summary.json").write_text("{}")
    proc = subprocess.run(["bash", str(ROOT / "run.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skip sgd-sgd-e1-average-seed0 (finished with this config)" in proc.stdout
    assert "--merging-strategy ties" in proc.stdout and "skip sgd-sgd-e1-ties" not in proc.stdout
    assert rx.folder_state(tmp_path / other.name, ["--merging-strategy", "ties"]) == "fresh"
