"""System heterogeneity tiers: what each tier downloads, trains, sends, and how it is evaluated."""

import json

import numpy as np
import pytest
import torch
from test_end_to_end import read_metrics, run

import config
import train_lora
from flasc.federation import tiers


def federation(tiny_overrides, **extra):
    cfg = config.load_config(
        overrides={
            **tiny_overrides,
            "lora_rank": 16,
            "lora_alpha": 16,
            "tiers": 3,
            "clients": 6,
            "server_batch": 6,
            **extra,
        }
    )
    fed = train_lora.build(cfg, torch.device("cpu"))
    with torch.no_grad():
        fed.server.copy_(torch.randn(fed.flat.numel, generator=torch.Generator().manual_seed(0)))
    return cfg, fed


def components(fed, mask):
    """Per LoRA layer: which components (rows of A, columns of B) a mask keeps."""
    named = fed.flat.named(mask)
    out = []
    for pair in fed.aggregator.pairs:
        a_rows = named[pair.a].all(dim=1)
        b_cols = named[pair.b].all(dim=0)
        assert torch.equal(a_rows, named[pair.a].any(dim=1)) and torch.equal(a_rows, b_cols)
        out.append(a_rows)
    return out


def test_assignment_mod_and_balanced_random():
    cfg = config.load_config(overrides={"tiers": 3, "clients": 10, "lora_rank": 16})
    assert tiers.assign(cfg).tolist() == [i % 3 for i in range(10)]
    rnd = config.load_config(overrides={"tiers": 3, "clients": 10, "lora_rank": 16, "tier_assignment": "random"})
    a = tiers.assign(rnd)
    assert sorted(np.bincount(a).tolist()) == [3, 3, 4] and a.tolist() != tiers.assign(cfg).tolist()
    assert a.tolist() == tiers.assign(rnd).tolist()


@pytest.mark.parametrize("syshet", ["rank", "rankl1"])
def test_rank_tiers_download_train_and_send_only_their_components(tiny_overrides, syshet):
    cfg, fed = federation(tiny_overrides, syshet=syshet)
    plans = tiers.plans(cfg, fed.server_state, fed.flat, fed.aggregator.pairs, 0, 1.0, 1.0)
    for i, plan in enumerate(plans):
        kept = components(fed, plan.download)
        assert all(int(k.sum()) == 4**i for k in kept)
        if syshet == "rank":
            assert all(bool(k[: 4**i].all()) for k in kept)
        else:  # the components of largest ||B_j||·||A_j||
            server = fed.flat.named(fed.server.detach())
            for pair, k in zip(fed.aggregator.pairs, kept):
                strength = server[pair.b].norm(dim=0) * server[pair.a].norm(dim=1)
                if bool((~k).any()):
                    assert strength[k].min() >= strength[~k].max()
        head = [n for n in fed.flat.names if "classifier" in n]
        assert all(bool(fed.flat.named(plan.download)[n].all()) for n in head)
    # a tier-0 client trains and sends only its one component
    client = next(c for c in range(cfg.clients) if fed.client_tier[c] == 0)
    plan = plans[0]
    start = fed.server_state.masked(plan.download)
    after, _ = fed.worker.train_client(0, client, start, fed.flat.split(plan.train.float()))
    assert torch.equal((start - after)[~plan.download], torch.zeros(int((~plan.download).sum())))
    stats = fed.run_round(0)
    assert stats["bytes_up_tier0"] == 2 * 4 * int(plans[0].download.sum())  # 2 tier-0 clients, values only
    index_bytes = 4 * len(fed.aggregator.pairs) if syshet == "rankl1" else 0  # rankl1 names its component
    assert stats["bytes_down_tier0"] == 2 * (4 * int(plans[0].download.sum()) + index_bytes)


def test_density_tiers_send_exactly_their_density(tiny_overrides, monkeypatch):
    cfg, fed = federation(tiny_overrides, syshet="density")
    plans = tiers.plans(cfg, fed.server_state, fed.flat, fed.aggregator.pairs, 0, 1.0, 1.0)
    lora = tiers.lora_entries(fed.flat, fed.aggregator.pairs, fed.server.device)
    n_lora = int(lora.sum())
    for i, plan in enumerate(plans):
        density = 4.0 ** -(2 - i)
        assert int(plan.download[lora].sum()) == int(n_lora * density)
        assert bool(plan.download[~lora].all())  # the head always goes down
        assert plan.ul_density == density
    sent = {}
    real = fed.aggregator.aggregate
    monkeypatch.setattr(
        fed.aggregator,
        "aggregate",
        lambda ups, s, r: (sent.update({u.client_id: int((u.delta != 0).sum()) for u in ups}), real(ups, s, r))[1],
    )
    fed.run_round(0)
    for client, nonzero in sent.items():
        assert nonzero <= int(fed.flat.numel * 4.0 ** -(2 - fed.client_tier[client]))


def test_each_tier_is_evaluated_with_its_own_mask(tiny_overrides, tmp_path):
    run(tiny_overrides, lora_rank=16, lora_alpha=16, tiers=3, syshet="rank", clients=6, server_batch=6, server_rounds=2)
    last = read_metrics(tmp_path / "runs" / "run")[-1]
    for i in range(3):
        assert f"tier{i}_test_accuracy" in last and f"bytes_up_tier{i}_total" in last
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["tier2_test_accuracy"] == last["tier2_test_accuracy"]
    assert last["bytes_up_tier0"] < last["bytes_up_tier1"] < last["bytes_up_tier2"]


def test_tier_evaluation_uses_the_tier_mask(tiny_overrides):
    cfg, fed = federation(tiny_overrides, syshet="rank")
    fed.run_round(0)
    out = fed.evaluation(fed.server_state, splits=("test",))
    for i, mask in enumerate(fed.tier_masks):
        fed.flat.write(fed.server_state.masked(mask))
        assert fed.evaluation.scores.on(fed.task.test)["accuracy"] == out[f"tier{i}_test_accuracy"]
    assert not torch.equal(fed.tier_masks[0], fed.tier_masks[2])


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"tiers": 3, "lora_rank": 8}, ["lora_rank", ">= 16"]),
        ({"tiers": 2, "lora_rank": 4, "dl_density": 0.5}, ["dl_density: 1"]),
        ({"tiers": 2, "lora_rank": 4, "merge_space": "product"}, ["merge_space: factors"]),
        ({"tiers": 2, "lora_rank": 0, "syshet": "density"}, ["lora_rank >= 1"]),
        ({"tiers": 2, "lora_rank": 4, "server_freeze": True}, ["server_freeze"]),
        ({"syshet": "bandwidth"}, ["syshet", "rankl1"]),
    ],
)
def test_tier_rejections(overrides, words):
    with pytest.raises(config.ConfigError) as e:
        config.load_config(overrides=overrides)
    for w in words:
        assert w in str(e.value)
