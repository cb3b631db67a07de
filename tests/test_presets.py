"""configs/paper/: the FLASC code's settings (../shared/SEED-REFERENCE.md), each validated and run
for one round with a tiny model on fixture data in the loaders' own formats."""

import pytest
import task_fixtures
import torch

import config
import train_lora

PRESETS = [
    "paper/cifar10_lora",
    "paper/cifar10_flasc_d4",
    "paper/cifar10_flasc_d16",
    "paper/cifar10_flasc_d64",
    "paper/20newsgroups_rank",
    "paper/20newsgroups_rankl1",
    "paper/20newsgroups_density",
    "paper/reddit",
    "paper/flair",
]

# The original's values, written out from the reference (not read from our files).
MAIN_SCRIPT = dict(
    server_batch=10,
    server_rounds=200,
    eval_freq=10,
    eval_masked=True,
    server_opt="adamw",
    server_lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    tau=1e-8,
    weight_decay=0.01,
    client_opt="sgd",
    client_lr=1e-3,
    client_batch=16,
    client_epochs=1,
    lora_rank=16,
    lora_alpha=16.0,
    lora_dropout=0.1,
    base_dropout=False,
)
CIFAR = dict(
    MAIN_SCRIPT, dataset="cifar10", model="vit", clients=500, partition="dirichlet", iid_alpha=0.1, augment=True
)
HET = dict(
    dataset="20newsgroups",
    model="gpt2",
    clients=350,
    partition="dirichlet",
    iid_alpha=0.1,
    server_batch=10,
    server_rounds=200,
    eval_freq=20,
    server_opt="adamw",
    server_lr=5e-3,
    beta2=0.999,
    tau=1e-8,
    weight_decay=0.01,
    client_opt="sgd",
    client_lr=5e-4,
    client_batch=16,
    client_epochs=1,
    tiers=3,
    tier_assignment="mod",
    lora_rank=16,
    base_dropout=False,
)
EXPECTED = {
    "paper/cifar10_lora": dict(CIFAR, dl_density=1.0, ul_density=1.0),
    "paper/cifar10_flasc_d4": dict(CIFAR, dl_density=1 / 4, ul_density=1 / 4),
    "paper/cifar10_flasc_d16": dict(CIFAR, dl_density=1 / 16, ul_density=1 / 16),
    "paper/cifar10_flasc_d64": dict(CIFAR, dl_density=1 / 64, ul_density=1 / 64),
    "paper/20newsgroups_rank": dict(HET, syshet="rank"),
    "paper/20newsgroups_rankl1": dict(HET, syshet="rankl1"),
    "paper/20newsgroups_density": dict(HET, syshet="density"),
    "paper/reddit": dict(MAIN_SCRIPT, dataset="reddit", model="gpt2", partition="natural", clients=500, iid_mix=0.1),
    "paper/flair": dict(MAIN_SCRIPT, dataset="flair", model="vit", partition="natural", clients=500, augment=False),
}


def test_presets_are_listed_and_hold_the_originals_values():
    assert set(PRESETS) <= set(config.list_configs())
    assert sorted(n for n in config.list_configs() if n.startswith("paper/")) == sorted(PRESETS)
    for name in PRESETS:
        cfg = config.load_config(name)
        assert {k: cfg[k] for k in EXPECTED[name]} == EXPECTED[name], name
        assert cfg.density == 0.2  # untouched options keep basic_config's defaults


def _fixture(dataset: str, data_dir):
    if dataset == "cifar10":
        task_fixtures.cifar10(data_dir, per_batch=6, n_test=6)
        return dict(model="tiny-vit", clients=4, server_batch=2)
    if dataset == "20newsgroups":
        task_fixtures.newsgroups(data_dir)
        return dict(model="tiny-gpt2", clients=6, server_batch=3, max_length=16)
    if dataset == "reddit":
        task_fixtures.reddit(data_dir, {f"u{i}": 3 for i in range(5)}, {"e1": 2})
        return dict(model="tiny-gpt2", clients=0, server_batch=2)
    task_fixtures.flair(data_dir, per_user=2)
    return dict(model="tiny-vit", clients=0, server_batch=2)


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_runs_a_round_with_a_tiny_model_on_fixture_data(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASC_OFFLINE", "1")
    small = _fixture(EXPECTED[name]["dataset"], tmp_path / "data")
    cfg = config.load_config(
        name,
        {
            **small,
            "data_dir": str(tmp_path / "data"),
            "dir": str(tmp_path / "runs"),
            "server_rounds": 1,
            "eval_batch": 8,
            "gpu": "cpu",
        },
    )
    assert cfg.server_opt == "adamw" and not cfg.base_dropout
    fed = train_lora.build(cfg, torch.device("cpu"))
    before = fed.server.detach().clone()
    record = fed.run_round(0)
    assert not torch.equal(before, fed.server.detach()) and torch.isfinite(fed.server.detach()).all()
    scores = fed.evaluation(fed.server_state)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in scores.values())
    if cfg.dl_density < 1:  # sparse downloads cost less than dense ones
        assert record["bytes_down"] < 4 * fed.flat.numel * cfg.server_batch


def test_newsgroups_reads_scikit_learns_cache_with_the_seeds_split(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASC_OFFLINE", "1")
    from data import newsgroups

    cache = task_fixtures.newsgroups(tmp_path, n_train=30, n_test=9)
    raw = newsgroups.load_raw(str(tmp_path))
    train, val, test = (raw.splits[s] for s in ("train", "val", "test"))
    assert raw.label_names == task_fixtures.NEWSGROUPS
    assert (len(train[0]), len(val[0]), len(test[0])) == (24, 6, 9)  # first 80% train, last 20% validate
    assert sorted(train[0] + val[0]) == sorted(cache["train"].data)
    for (texts, labels), part in ((train, "train"), (val, "train"), (test, "test")):
        label_of = dict(zip(cache[part].data, cache[part].target.tolist()))
        assert labels == [label_of[t] for t in texts]


def test_extends_chains_configs_and_refuses_cycles_and_unknown_parents(tmp_path, monkeypatch):
    (tmp_path / "paper").mkdir()
    (tmp_path / "basic_config.yaml").write_text((config.CONFIG_DIR / "basic_config.yaml").read_text())
    (tmp_path / "base.yaml").write_text("# base\nclient_lr: 0.2\nserver_lr: 0.5\n")
    (tmp_path / "paper" / "child.yaml").write_text("# child\nextends: base\nserver_lr: 0.7\n")
    (tmp_path / "loop_a.yaml").write_text("extends: loop_b\n")
    (tmp_path / "loop_b.yaml").write_text("extends: loop_a\n")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    child = config.load_config("paper/child", {"client_batch": 4})
    assert (child.client_lr, child.server_lr, child.client_batch) == (0.2, 0.7, 4)
    with pytest.raises(config.ConfigError, match="extends loop_a, which extends it back"):
        config.load_config("loop_a")
    with pytest.raises(config.ConfigError, match="configs/orphan.yaml: extends: no config named 'nowhere'"):
        config.load_config("orphan")
    with pytest.raises(config.ConfigError, match="--config: no config named '../base'"):
        config.load_config("../base")
