"""The image and language-modelling tasks: each loader on a fixture in the exact on-disk format,
short federated runs with tiny random models, and the one-line errors for missing data."""

import json

import numpy as np
import pytest
import task_fixtures
import torch
from conftest import reloaded_test_metrics

import config
import train_lora
from data import DataUnavailable, fashion_mnist, load_task, partition
from data.images import CIFAR_MEAN, CIFAR_STD, read_idx


# ---------------------------------------------------------------- Fashion-MNIST (IDX)
def test_idx_reader_agrees_with_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    written = task_fixtures.fashion_mnist(tmp_path)
    images, labels = written["train"]
    raw = tmp_path / "raw-images-idx3-ubyte"
    raw.write_bytes(
        __import__("gzip").decompress((tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz").read_bytes())
    )
    assert np.array_equal(read_idx(raw), read_image_file(str(raw)).numpy())
    assert np.array_equal(read_idx(raw), images)
    assert np.array_equal(read_idx(tmp_path / "fashion_mnist" / "train-labels-idx1-ubyte.gz"), labels)
    raw_labels = tmp_path / "raw-labels-idx1-ubyte"
    raw_labels.write_bytes(
        __import__("gzip").decompress((tmp_path / "fashion_mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    )
    assert np.array_equal(read_idx(raw_labels), read_label_file(str(raw_labels)).numpy())


def test_fashion_mnist_splits_and_transform(tmp_path):
    written = task_fixtures.fashion_mnist(tmp_path, n_train=50, n_test=20)
    task = load_task("fashion_mnist", str(tmp_path))
    assert (len(task.train), len(task.val), len(task.test)) == (40, 10, 20)  # the seeds' 80/20 split
    assert task.label_names[0] == "T-shirt/top" and task.num_labels == 10
    train_images, train_labels = written["train"]
    assert task.val.labels.tolist() == train_labels[40:].tolist()
    batch = task.train.batch(torch.tensor([0, 3]))
    x = batch["pixel_values"]
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated to RGB
    # a constant image stays constant when upscaled; 0 -> -1, 255 -> 1
    task.train.images[0].fill_(255)
    task.train.images[3].fill_(0)
    x = task.train.batch(torch.tensor([0, 3]))["pixel_values"]
    assert torch.allclose(x[0], torch.ones_like(x[0])) and torch.allclose(x[1], -torch.ones_like(x[1]))
    assert batch["labels"].tolist() == [int(train_labels[0]), int(train_labels[3])]


def test_fashion_mnist_missing_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-such-folder")
    monkeypatch.setenv("FLASC_OFFLINE", "1")
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion_mnist", str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- CIFAR-10 (pickle batches)
def test_cifar10_pickle_batches(tmp_path):
    written = task_fixtures.cifar10(tmp_path, per_batch=10, n_test=10)
    task = load_task("cifar10", str(tmp_path))
    assert (len(task.train), len(task.val), len(task.test)) == (40, 10, 10)
    assert task.label_names[:2] == ["airplane", "automobile"]
    data, labels = written["data_batch_5"]  # the last 20% = batch 5
    assert task.val.labels.tolist() == labels
    # rows are R, G, B planes of 32 x 32
    assert torch.equal(task.val.images[3], torch.from_numpy(data[3].reshape(3, 32, 32)))
    assert torch.equal(task.val.images[3][1, 0, :5], torch.from_numpy(data[3][1024:1029]))
    # evaluation: resize to 224, CIFAR mean/std; a constant image maps to its normalised value
    task.test.images[0].fill_(255)
    x = task.test.batch(torch.tensor([0, 1]))["pixel_values"]
    assert x.shape == (2, 3, 224, 224)
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((224, 224), (1 - CIFAR_MEAN[c]) / CIFAR_STD[c]), atol=1e-5)


def test_cifar10_training_crops_are_seeded(tmp_path):
    task_fixtures.cifar10(tmp_path)
    task = load_task("cifar10", str(tmp_path), augment=True)
    idx = torch.tensor([0, 1, 2])
    torch.manual_seed(1)
    a = task.train.batch(idx)["pixel_values"]
    torch.manual_seed(1)
    b = task.train.batch(idx)["pixel_values"]
    torch.manual_seed(2)
    c = task.train.batch(idx)["pixel_values"]
    assert a.shape == (3, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- FLAIR (JSON + JPEGs)
def test_flair_layout_labels_and_users(tmp_path):
    records = task_fixtures.flair(tmp_path, per_user=3)
    task = load_task("flair", str(tmp_path))
    present = sorted({name for r in records for name in r["labels"]})
    assert task.label_names == present
    train = [r for r in records if r["partition"] == "train"]
    assert (len(task.train), len(task.val), len(task.test)) == (9, 3, 3)
    for i, r in enumerate(train):
        assert [task.label_names[j] for j in torch.nonzero(task.train.labels[i]).flatten()] == sorted(r["labels"])
    assert task.users.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    batch = task.test.batch(torch.tensor([0, 2]))
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["labels"].shape == (2, len(present))
    assert [len(c) for c in partition.natural(task.users, 0)] == [3, 3, 3]


def test_flair_trains_on_resized_images_unless_augment(tmp_path):
    # the seeds' active FLAIR loader resizes training images exactly as evaluation images
    task_fixtures.flair(tmp_path)
    idx = torch.tensor([0, 4])
    plain = load_task("flair", str(tmp_path))
    torch.manual_seed(1)
    a = plain.train.batch(idx)["pixel_values"]
    torch.manual_seed(2)
    b = plain.train.batch(idx)["pixel_values"]
    same_as_eval = flair_eval_transform([plain.train._image(int(i)) for i in idx])
    assert torch.equal(a, b) and torch.allclose(a, same_as_eval)
    augmented = load_task("flair", str(tmp_path), augment=True)
    torch.manual_seed(1)
    c = augmented.train.batch(idx)["pixel_values"]
    torch.manual_seed(1)
    assert torch.equal(c, augmented.train.batch(idx)["pixel_values"]) and not torch.allclose(c, a)


def flair_eval_transform(images):
    """Resize the shorter side to 224, centre crop, ImageNet mean/std, with torchvision directly."""
    from torchvision.transforms import v2

    from data.images import IMAGENET_MEAN, IMAGENET_STD

    steps = v2.Compose([v2.Resize(224, antialias=True), v2.CenterCrop(224)])
    x = torch.stack([steps(im) for im in images]).float() / 255
    return v2.functional.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_flair_missing_image_is_reported(tmp_path):
    task_fixtures.flair(tmp_path)
    (tmp_path / "flair" / "small_images" / "u2_001.jpg").unlink()
    with pytest.raises(DataUnavailable, match="u2_001.jpg"):
        load_task("flair", str(tmp_path))


# ---------------------------------------------------------------- Reddit (client lists + token files)
class _Tok:
    pad_token_id = 0


def test_reddit_layout_users_and_padding(tmp_path):
    train_users = {f"user{i}": 2 + i for i in range(5)}
    x = task_fixtures.reddit(tmp_path, train_users, {"e1": 3, "e2": 2}, length=12)
    task = load_task("reddit", str(tmp_path), lambda: (_Tok(), "tok"))
    # the first 80% of the training users train (4 of 5), the fifth validates, eval users test
    assert torch.equal(task.train.input_ids, torch.cat([x[f"user{i}"] for i in range(4)]))
    assert torch.equal(task.val.input_ids, x["user4"])
    assert torch.equal(task.test.input_ids, torch.cat([x["e1"], x["e2"]]))
    assert task.users.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    lengths = (x["user0"] != 0).sum(1)  # the fixture pads only at the end
    assert task.train.attention_mask[:2].sum(1).tolist() == lengths.tolist()
    batch = task.train.batch(torch.tensor([0, 1]))
    assert "labels" not in batch and batch["input_ids"].shape[1] == int(lengths.max())
    short = load_task("reddit", str(tmp_path), lambda: (_Tok(), "tok"), max_length=8)
    assert short.train.input_ids.shape[1] == 8


def test_reddit_missing_token_file_is_reported(tmp_path):
    task_fixtures.reddit(tmp_path, {"a": 2, "b": 2}, {"c": 2})
    (tmp_path / "reddit" / "cache" / "b.pt").unlink()
    with pytest.raises(DataUnavailable, match="user b has no token file"):
        load_task("reddit", str(tmp_path), lambda: (_Tok(), "tok"))


def test_natural_partition_takes_the_first_users():
    users = np.array([0, 1, 0, 2, 1, 2, 2])
    assert [c.tolist() for c in partition.natural(users, 0)] == [[0, 2], [1, 4], [3, 5, 6]]
    assert [c.tolist() for c in partition.natural(users, 2)] == [[0, 2], [1, 4]]
    with pytest.raises(ValueError, match="3 users"):
        partition.natural(users, 4)


# ---------------------------------------------------------------- short federated runs
def _run(tmp_path, **overrides):
    base = {
        "data_dir": str(tmp_path),
        "dir": str(tmp_path / "runs"),
        "name": "run",
        "server_rounds": 2,
        "eval_freq": 1,
        "lora_rank": 4,
        "lora_alpha": 8,
        "client_batch": 4,
        "eval_batch": 8,
        "gpu": "cpu",
        "ckpt_freq": 0,
    }
    cfg = config.load_config(overrides=base | overrides)
    run_dir = train_lora.train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, metrics


def test_fashion_mnist_run_with_tiny_efficientnet(tmp_path):
    task_fixtures.fashion_mnist(tmp_path, n_train=60, n_test=16)
    run_dir, summary, metrics = _run(
        tmp_path, dataset="fashion_mnist", model="tiny-efficientnet", clients=4, server_batch=2, client_lr=0.01
    )
    assert summary["primary_metric"] == "accuracy"
    assert 0 <= summary["test_accuracy"] <= 1 and "test_macro_f1" in summary
    assert metrics[-1]["bytes_up"] > 0
    assert reloaded_test_metrics(run_dir, batch=8)["accuracy"] == summary["test_accuracy"]


def test_augmented_statistics_examples_draw_from_the_clients_own_stream(tmp_path):
    """The examples a client computes Fisher / Gram statistics on are augmented from a stream seeded
    by (seed, round, client), whatever state the process's generator is in (the group, K), and
    leave that state as they found it."""
    task_fixtures.cifar10(tmp_path, per_batch=6, n_test=6)
    cfg = config.load_config(
        overrides={
            "dataset": "cifar10",
            "model": "tiny-vit",
            "data_dir": str(tmp_path),
            "clients": 3,
            "server_batch": 2,
            "lora_rank": 2,
            "gpu": "cpu",
            "merging_strategy": "fisher",
            "fisher_examples": 3,
        }
    )
    worker = train_lora.build(cfg, torch.device("cpu")).worker
    assert cfg.augment  # configs/datasets/cifar10.yaml
    torch.manual_seed(1)
    a = worker.client_examples(0, 1, 3)["pixel_values"]
    after = torch.get_rng_state()
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), after)  # the call left the generator alone
    torch.manual_seed(2)
    b = worker.client_examples(0, 1, 3)["pixel_values"]
    assert torch.equal(a, b)
    assert not torch.equal(a, worker.client_examples(1, 1, 3)["pixel_values"])  # another round, other crops


def test_cifar10_run_with_tiny_vit_and_regmean(tmp_path):
    task_fixtures.cifar10(tmp_path, per_batch=6, n_test=6)
    _, summary, _ = _run(
        tmp_path,
        dataset="cifar10",
        model="tiny-vit",
        clients=3,
        server_batch=2,
        server_rounds=1,
        merging_strategy="regmean",
        regmean_examples=4,
    )
    assert 0 <= summary["test_accuracy"] <= 1


def test_flair_run_is_multilabel_with_natural_clients(tmp_path):
    task_fixtures.flair(tmp_path, per_user=4)
    run_dir, summary, metrics = _run(
        tmp_path,
        dataset="flair",
        model="tiny-vit",
        clients=0,
        server_batch=2,
        merging_strategy="fisher",
        merge_space="product",
        fisher_examples=2,
    )
    saved = config.from_mapping(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    assert saved.clients == 3  # clients 0 = every training user, recorded resolved
    assert summary["primary_metric"] == "micro_f1"
    for key in (
        "test_micro_f1",
        "test_macro_f1",
        "test_micro_precision",
        "test_micro_recall",
        "test_macro_precision",
        "test_macro_recall",
        "best_test_micro_f1",
        "test_micro_f1_at_best_val",
    ):
        assert key in summary
    report = json.loads((run_dir / "partition.json").read_text())
    assert [c["examples"] for c in report["clients"]] == [4, 4, 4]
    assert 0 <= metrics[0]["train_accuracy"] <= 1


def test_reddit_run_is_next_token_prediction(tmp_path):
    task_fixtures.reddit(tmp_path, {f"u{i}": 3 for i in range(5)}, {"e": 3}, vocab=60)
    run_dir, summary, metrics = _run(
        tmp_path, dataset="reddit", model="tiny-gpt2", clients=0, server_batch=2, iid_mix=0.5
    )
    assert summary["primary_metric"] == "accuracy"
    assert summary["test_perplexity"] == pytest.approx(np.exp(summary["test_loss"]), rel=1e-6)
    assert metrics[0]["train_loss"] > 0
    assert reloaded_test_metrics(run_dir, batch=8)["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


# ---------------------------------------------------------------- missing data: one line, exit 2
@pytest.mark.parametrize("dataset", ["cifar10", "reddit", "flair"])
def test_missing_data_fails_with_one_clear_line(tmp_path, monkeypatch, capsys, dataset):
    """train_lora.py's main, in this process (tests/test_config.py runs the script itself): exit 2,
    stderr one line naming the data set, nothing else."""
    monkeypatch.setenv("FLASC_OFFLINE", "1")
    empty = tmp_path / "empty"
    argv = ["--config", "fedavg", "--dataset", dataset, "--data-dir", str(empty), "--dir", str(tmp_path / "runs")]
    assert train_lora.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: dataset {dataset}"), err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not empty.exists()
