"""Clients trained together (client_parallelism, stacked.py): each client's update is the one it
gets trained alone (ClientWorker.train_job), for every option that acts per client."""

import json

import conftest
import numpy as np
import pytest
import task_fixtures
import torch

import config
import data
import train_lora
from data.text import RawTexts
from flasc import models
from flasc.tasks.evaluation import evaluate

# float32: the batched products sum in another order than one client's. With SGD the parameters
# agree to 1e-6 (measured: below 4e-8 on updates of about 0.1); adaptive optimizers divide by the
# root of the second moment, so an entry with a near-zero gradient amplifies a last-bit difference:
# 2e-5 there (measured up to 5e-6, against per-step moves of up to lr = 0.1). The training loss they
# report then differs alike: up to 7e-6 relative over two epochs with yogi (AMD EPYC), so the loss is
# compared at the tolerance of the parameters.
TOL, ADAPTIVE_TOL = 1e-6, 2e-5
NO_DROPOUT = {"lora_dropout": 0.0, "base_dropout": False}


def ragged_raw(data_dir: str):
    """conftest's topics in texts of 2 to 14 words, so that minibatches differ in width."""
    rng = np.random.default_rng(1)

    def make(n):
        texts, labels = [], []
        for label, words in enumerate(conftest.TOPIC_WORDS):
            for _ in range(n):
                texts.append(" ".join(rng.choice(words + ["the", "news", "said"], int(rng.integers(2, 15)))))
                labels.append(label)
        return texts, labels

    return RawTexts(["business", "entertainment", "politics"], {"train": make(40), "val": make(8), "test": make(10)})


@pytest.fixture(autouse=True)
def ragged_dataset(monkeypatch):
    monkeypatch.setitem(
        data.DATASETS,
        "ragged",
        data.DatasetSpec(
            data.text_classification(ragged_raw), "text", "single_label", "tiny-bert", default_max_length=16
        ),
    )


def federation(overrides: dict, **extra):
    cfg = config.load_config(None, {**overrides, "dataset": "ragged", "clients": 8, "server_batch": 5, **extra})
    return train_lora.build(cfg, torch.device("cpu"))


def alone_and_together(fed, rnd: int = 0, group: int | None = None):
    """Every sampled client of round rnd trained alone, then in groups of `group` (all at once: None)."""
    jobs = fed.plan_round(rnd).jobs
    alone = [fed.worker.train_job(rnd, job) for job in jobs]
    size = group or len(jobs)
    together = [r for i in range(0, len(jobs), size) for r in fed.worker.train_together(rnd, jobs[i : i + size])]
    return jobs, alone, together


def assert_same(jobs, alone, together, tol: float = TOL):
    for job, (a, ma), (b, mb) in zip(jobs, alone, together):
        assert float((a - job.start).abs().max()) > 1e-3, "the client did not train"
        assert float((a - b).abs().max()) <= tol, f"client {job.client_id}"
        assert {k: v for k, v in ma.items() if k != "loss_sum"} == {k: v for k, v in mb.items() if k != "loss_sum"}
        assert mb["loss_sum"] == pytest.approx(ma["loss_sum"], rel=max(tol, 1e-6))


def first_widths(fed, jobs) -> set[int]:
    return {next(fed.worker.client_batches(0, j.client_id))["input_ids"].shape[1] for j in jobs}


@pytest.mark.parametrize(
    "extra",
    [
        {},  # sgd with momentum, unequal client sizes
        {"client_opt": "adam"},
        {"client_opt": "yogi", "client_epochs": 2},
        {"mu": 0.5},  # FedProx
        {"dl_density": 0.5, "client_freeze": True},  # masked gradients
        {"tiers": 2, "syshet": "rank"},  # different downloads and masks per client
        {"client_epochs": 3, "early_stopping": 0.3},  # clients stop after different epochs
        {"freeze_a": True},  # one frozen A shared by the clients
        {"lora_rank": 0},  # the head alone
    ],
    ids=[
        "sgd",
        "adam",
        "yogi-2-epochs",
        "fedprox",
        "client-freeze",
        "tiers",
        "early-stopping",
        "freeze-a",
        "head-only",
    ],
)
def test_grouped_clients_get_the_updates_they_get_alone(tiny_overrides, extra):
    fed = federation(tiny_overrides, **NO_DROPOUT, client_batch=4, iid_alpha=0.3, **extra)
    jobs, alone, together = alone_and_together(fed)
    sizes = [len(fed.clients[j.client_id]) for j in jobs]
    assert len(set(sizes)) > 1 and len(first_widths(fed, jobs)) > 1  # unequal rows and widths are exercised
    assert_same(jobs, alone, together, ADAPTIVE_TOL if extra.get("client_opt") in ("adam", "yogi") else TOL)
    if "early_stopping" in extra:
        assert len({m["epochs"] for _, m in alone}) > 1
    if "tiers" in extra:
        assert len({j.tier for j in jobs}) > 1


@pytest.mark.parametrize("model, group", [("tiny-bert", 2), ("tiny-bert", 5), ("tiny-gpt2", 5)])
def test_dropout_draws_are_each_clients_own_in_any_group(tiny_overrides, model, group):
    """With dropout on, a client draws its own masks at its own width: the same result in any group."""
    fed = federation(tiny_overrides, model=model, lora_dropout=0.2, client_batch=4, iid_alpha=0.3)
    jobs, alone, together = alone_and_together(fed, group=group)
    assert_same(jobs, alone, together)
    quiet = federation(tiny_overrides, model=model, **NO_DROPOUT, client_batch=4, iid_alpha=0.3)
    without = [quiet.worker.train_job(0, job) for job in jobs]
    assert all(float((a - w).abs().max()) > 1e-4 for (a, _), (w, _) in zip(alone, without))  # dropout acted


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_a_llama_folder_groups_as_alone_also_on_a_4bit_base(tiny_overrides, model_folders, quantization):
    """A Hugging Face model through the generic path (decoder attention, its score head at the last
    token), and peft's bitsandbytes LoRA layers routed like torch's."""
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    folder = str(model_folders["llama"])
    fed = federation(
        tiny_overrides, **NO_DROPOUT, client_batch=4, iid_alpha=0.3, model=folder, quantization=quantization
    )
    if quantization != "none":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in fed.model.modules())
    jobs, alone, together = alone_and_together(fed)
    assert len(first_widths(fed, jobs)) > 1
    assert_same(jobs, alone, together, 1e-5)


def test_next_token_language_model(tmp_path):
    task_fixtures.reddit(tmp_path, {f"u{i}": 3 + i for i in range(6)}, {"e": 3}, vocab=60)
    cfg = config.load_config(
        None,
        {
            "dataset": "reddit",
            "model": "tiny-gpt2",
            "data_dir": str(tmp_path),
            "clients": 0,
            "server_batch": 4,
            "lora_rank": 4,
            "client_batch": 2,
            "client_lr": 0.1,
            "gpu": "cpu",
            "lora_dropout": 0.1,
        },
    )
    fed = train_lora.build(cfg, torch.device("cpu"))
    assert_same(*alone_and_together(fed))


@pytest.mark.parametrize("augment", [False, True])
def test_vision_transformer_with_augmentation(tmp_path, augment):
    task_fixtures.cifar10(tmp_path, per_batch=8, n_test=4)
    cfg = config.load_config(
        None,
        {
            "dataset": "cifar10",
            "model": "tiny-vit",
            "data_dir": str(tmp_path),
            "clients": 5,
            "server_batch": 4,
            "lora_rank": 4,
            "client_batch": 3,
            "client_lr": 0.1,
            "gpu": "cpu",
            "lora_dropout": 0.1,
            "augment": augment,
            "partition": "iid",
        },
    )
    fed = train_lora.build(cfg, torch.device("cpu"))
    assert_same(*alone_and_together(fed, group=3))


@pytest.mark.parametrize(
    "algorithm", ["fedavg", "scaffold", "hetlora", "fedsa", "rolora", "fedsb", "fedsvd", "lorafair"]
)
def test_rounds_match_one_client_at_a_time(tiny_overrides, algorithm):
    """Two whole rounds (SCAFFOLD's offsets and HetLoRA's penalty act from round 2): the server
    after them, with three clients at a time and with one."""
    extra = {"algorithm": algorithm, "eval_personalized": algorithm == "fedsa", "client_batch": 4}
    if algorithm == "hetlora":
        extra.update(tiers=2, hetlora_prune=True)
    servers = []
    for k in (1, 3):
        fed = federation(tiny_overrides, client_parallelism=k, **extra)
        for rnd in range(2):
            fed.run_round(rnd)
        servers.append(fed.server.detach().clone())
    assert float((servers[0] - servers[1]).abs().max()) <= 1e-5


def test_run_saves_a_plain_peft_adapter_equal_to_one_at_a_time(tiny_overrides):
    """A whole run with three clients at a time: its saved adapter is an ordinary peft adapter that
    loads into a fresh model, and it equals the one-at-a-time run's adapter."""
    from safetensors.torch import load_file

    saved = []
    for k in (1, 3):
        run_dir = train_lora.train(
            config.load_config(None, {**tiny_overrides, "client_parallelism": k, "name": f"k{k}"})
        )
        saved.append(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    assert saved[0].keys() == saved[1].keys() and any("lora_A" in n for n in saved[0])
    assert all(float((saved[0][n] - saved[1][n]).abs().max()) <= 1e-5 for n in saved[0])
    # the saved adapter loads into a fresh base model and scores what the run reported
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = config.load_config(None, tiny_overrides)
    task = data.load_task(cfg.dataset, cfg.data_dir, lambda: models.load_tokenizer(cfg), cfg.max_length)
    model = models.load_trained(cfg, run_dir / "adapter", task.num_labels, 0)
    assert (
        evaluate(model, task.test, task.objective, 8, torch.device("cpu"), False)["accuracy"]
        == summary["test_accuracy"]
    )


def test_routing_is_undone_after_the_group(tiny_overrides):
    """Outside a group the model is the ordinary peft model: evaluation is unchanged by training a group."""
    fed = federation(tiny_overrides, **NO_DROPOUT)
    fed.flat.write(fed.server.detach())
    before = fed.evaluation(fed.server_state, ("val",))
    alone_and_together(fed)
    fed.flat.write(fed.server.detach())
    assert fed.evaluation(fed.server_state, ("val",)) == before
    assert all("forward" not in vars(m) for m in fed.model.modules())


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"lora_rank": -1}, "lora_rank -1"),
        ({"dataset": "fashion_mnist", "model": "tiny-efficientnet", "max_length": 0}, "adapts convolutions"),
    ],
)
def test_refuses_what_cannot_be_stacked(tiny_overrides, extra, key):
    with pytest.raises(config.ConfigError, match=r"client_parallelism: .*" + key):
        config.load_config(None, {**tiny_overrides, "client_parallelism": 4, **extra})
