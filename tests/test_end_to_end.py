"""train_lora.py end to end on a tiny model and the toy task."""

import json

import pytest
import torch
import yaml
from conftest import reloaded_test_metrics

import config
import train_lora
from data import load_task
from flasc import models
from flasc.tasks.evaluation import evaluate


def argv_of(overrides):
    out = []
    for k, v in overrides.items():
        out += [f"--{k.replace('_', '-')}", "null" if v is None else str(v)]
    return out


def run(overrides, **extra):
    assert train_lora.main(argv_of({**overrides, **extra})) == 0


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_contents_and_saved_adapter_reproduces_final_eval(tiny_overrides, tmp_path):
    run(tiny_overrides, dl_density=0.5, ul_density=0.5)
    run_dir = tmp_path / "runs" / "run"
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "train.log",
        "tb",
        "adapter",
    }
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["dl_density"] == 0.5 and set(saved) == set(config.SCHEMA)

    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert "test_accuracy" in metrics[1] and "test_accuracy" not in metrics[0]  # eval_freq 2 + last
    for key in (
        "train_loss",
        "train_accuracy",
        "update_norm",
        "dl_density",
        "ul_density",
        "bytes_up",
        "bytes_down",
        "bytes_up_total",
        "bytes_down_total",
        "seconds",
    ):
        assert key in metrics[0]
    for key in ("val_loss", "val_accuracy", "val_macro_f1", "test_loss", "test_accuracy", "test_macro_f1"):
        assert key in metrics[-1]
    assert metrics[-1]["bytes_up_total"] == sum(m["bytes_up"] for m in metrics)

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("test_accuracy", "best_test_accuracy", "bytes_up", "bytes_down", "wall_time_s", "rounds"):
        assert key in summary
    assert summary["test_accuracy"] == metrics[-1]["test_accuracy"]
    assert summary["bytes_up"] == metrics[-1]["bytes_up_total"] and summary["rounds"] == 3

    again = reloaded_test_metrics(run_dir)
    assert again["accuracy"] == summary["test_accuracy"]
    assert again["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


def test_same_seed_same_metrics_other_seed_differs(tiny_overrides, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(tiny_overrides, name=name, seed=seed)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in ms]  # noqa: E731
    a, b, c = (strip(read_metrics(tmp_path / "runs" / n)) for n in "abc")
    assert a == b
    assert a != c


def test_existing_folder_is_never_overwritten(tiny_overrides, tmp_path):
    run(tiny_overrides, server_rounds=1)
    run(tiny_overrides, server_rounds=1)
    assert (tmp_path / "runs" / "run" / "summary.json").exists()
    assert (tmp_path / "runs" / "run-1" / "summary.json").exists()


def test_zero_rounds_evaluates_and_saves_the_initial_model(tiny_overrides, tmp_path):
    run(tiny_overrides, server_rounds=0)
    run_dir = tmp_path / "runs" / "run"
    metrics = read_metrics(run_dir)
    assert len(metrics) == 1 and metrics[0]["round"] == 0 and "test_accuracy" in metrics[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bytes_up"] == 0 and summary["rounds"] == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("rank", [0, -1])
def test_head_only_and_full_finetune_save_and_reload(tiny_overrides, tmp_path, rank):
    run(tiny_overrides, lora_rank=rank, server_rounds=1)
    run_dir = tmp_path / "runs" / "run"
    cfg = config.from_mapping(yaml.safe_load((run_dir / "config.yaml").read_text()))
    tok, tag = models.load_tokenizer(cfg)
    task = load_task(cfg.dataset, cfg.data_dir, lambda: (tok, tag), cfg.max_length)
    model = models.load_trained(cfg, run_dir / "adapter", task.num_labels, tok.pad_token_id)
    acc = evaluate(model, task.test, task.objective, 64, torch.device("cpu"), False)["accuracy"]
    assert acc == json.loads((run_dir / "summary.json").read_text())["test_accuracy"]


def test_gpt2_family_runs(tiny_overrides, tmp_path):
    run(tiny_overrides, model="tiny-gpt2", server_rounds=1)
    assert (tmp_path / "runs" / "run" / "summary.json").exists()


def test_training_learns_the_toy_task(tiny_overrides, tmp_path):
    run(
        tiny_overrides,
        server_rounds=8,
        clients=4,
        server_batch=4,
        client_epochs=2,
        partition="iid",
        client_lr=0.2,
        eval_freq=8,
    )
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9


def test_unavailable_dataset_is_one_clear_error(tiny_overrides, tmp_path, monkeypatch, capsys):
    import sklearn.datasets

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(sklearn.datasets, "fetch_20newsgroups", offline)
    assert train_lora.main(argv_of({**tiny_overrides, "dataset": "20newsgroups"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "20newsgroups" in err[0] and "network" in err[0]
    assert not (tmp_path / "runs").exists()
