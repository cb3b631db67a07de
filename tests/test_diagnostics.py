"""Client-drift statistics against hand computations; targets and the area under the curve."""

import json
import math

import pytest
import torch

import config
import train_lora
from flasc.diagnostics.drift import drift, effective_rank, sign_conflict


def test_drift_statistics_by_hand():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    out = drift([a, b], [7, 2], {})
    assert out["drift_cosine_mean"] == pytest.approx(0.0) and out["drift_cosine_min"] == pytest.approx(0.0)
    assert out["drift_norm_cv"] == pytest.approx(0.5 / 3.5)  # norms 3, 4: std 0.5, mean 3.5
    # mean update (1.5, 2); each client is 2.5 away from it; divided by the mean norm 3.5
    assert out["drift_distance_mean"] == pytest.approx(2.5 / 3.5) and out["drift_distance_max"] == pytest.approx(
        2.5 / 3.5
    )
    assert out["drift_distance_by_client"] == pytest.approx({"7": 2.5 / 3.5, "2": 2.5 / 3.5})
    p = [3 / 7, 4 / 7]  # orthogonal: singular values = norms
    assert out["drift_effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert out["drift_sign_conflict"] == 0.0  # no entry is sent by both

    three = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])]
    out = drift(three, [0, 1, 2], {})
    assert out["drift_cosine_mean"] == pytest.approx(math.sqrt(2) / 3)  # pairs: 0, 1/√2, 1/√2
    assert out["drift_cosine_min"] == pytest.approx(0.0)


def test_sign_conflicts_count_entries_sent_by_two_or_more():
    x = torch.tensor([[1.0, -1.0, 0.0, 2.0], [2.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 3.0, 0.0]])
    assert sign_conflict(x) == (2, 2)  # entries 0 and 1 are shared and disagree; 2 and 3 are one client's
    x[1, 1] = -3.0
    assert sign_conflict(x) == (1, 2)
    layers = {"l1": x.reshape(3, 2, 2), "l2": torch.tensor([[[1.0]], [[1.0]], [[0.0]]])}
    out = drift(list(x), [0, 1, 2], layers)
    assert out["drift_sign_conflict_product_by_layer"] == {"l1": 0.5, "l2": 0.0}
    assert out["drift_sign_conflict_product"] == pytest.approx(1 / 3)  # pooled: 1 conflict of 3 shared entries


def test_effective_rank_bounds():
    v = torch.tensor([1.0, 2.0, -1.0])
    assert effective_rank(torch.stack([v, 2 * v, -v])) == pytest.approx(1.0)
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)


def test_a_round_logs_drift_and_one_client_logs_no_pairs(tiny_overrides):
    cfg = config.load_config(overrides={**tiny_overrides, "dl_density": 0.5})
    fed = train_lora.build(cfg, torch.device("cpu"))
    record = fed.run_round(0)
    assert 0 < record["drift_effective_rank"] <= cfg.server_batch
    assert set(record["drift_distance_by_client"]) == {str(c) for c in fed.sample_clients(0)}
    assert set(record["drift_sign_conflict_product_by_layer"]) == {p.name for p in fed.aggregator.pairs}
    cfg = config.load_config(overrides={**tiny_overrides, "server_batch": 1})
    record = train_lora.build(cfg, torch.device("cpu")).run_round(0)
    assert "drift_cosine_mean" not in record and "drift_norm_cv" in record
    cfg = config.load_config(overrides={**tiny_overrides, "drift_stats": False})
    assert not any(k.startswith("drift_") for k in train_lora.build(cfg, torch.device("cpu")).run_round(0))


def test_convergence_targets_and_area_by_hand():
    from flasc.diagnostics.convergence import convergence

    evals = [
        {"round": 2, "val_accuracy": 0.5, "bytes_up_total": 1e6, "bytes_down_total": 2e6, "elapsed_seconds": 10.0},
        {"round": 4, "val_accuracy": 0.7, "bytes_up_total": 2e6, "bytes_down_total": 4e6, "elapsed_seconds": 20.0},
        {"round": 8, "val_accuracy": 0.9, "bytes_up_total": 4e6, "bytes_down_total": 8e6, "elapsed_seconds": 40.0},
    ]
    # trapezoids: 2 * (0.5 + 0.7) / 2 + 4 * (0.7 + 0.9) / 2 = 1.2 + 3.2, over 6 rounds
    assert convergence(evals, "accuracy", None) == {"val_accuracy_auc": pytest.approx(4.4 / 6)}
    out = convergence(evals, "accuracy", 0.7)
    assert (out["rounds_to_target"], out["megabytes_to_target"], out["seconds_to_target"]) == (4, 6.0, 20.0)
    out = convergence(evals, "accuracy", 0.95)
    assert out["rounds_to_target"] is None and out["megabytes_to_target"] is None and out["seconds_to_target"] is None


def test_summary_records_the_target(tiny_overrides, tmp_path):
    run_dir = train_lora.train(config.load_config(overrides={**tiny_overrides, "target_accuracy": 0.0}))
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(m for m in metrics if "val_accuracy" in m)
    assert summary["rounds_to_target"] == first_eval["round"] == 2  # eval_freq 2: reached at once
    assert (
        summary["seconds_to_target"]
        == first_eval["elapsed_seconds"]
        == pytest.approx(sum(m["seconds"] for m in metrics[:2]))
    )
    assert summary["megabytes_to_target"] == (first_eval["bytes_up_total"] + first_eval["bytes_down_total"]) / 1e6
