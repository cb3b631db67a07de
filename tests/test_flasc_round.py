"""The FLASC update rule against hand computations on a tiny model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import train_lora


def build(tiny_overrides, **extra):
    cfg = config.load_config(overrides={**tiny_overrides, **extra})
    return cfg, train_lora.build(cfg, torch.device("cpu"))


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def topk_by_sorting(x: np.ndarray, density: float) -> np.ndarray:
    k = int(len(x) * density)
    mask = np.zeros(len(x), bool)
    mask[np.argsort(-np.abs(x), kind="stable")[:k]] = True
    return mask


def test_round_masked_download_topk_upload_mean_and_server_step(tiny_overrides, monkeypatch):
    cfg, fed = build(tiny_overrides, dl_density=0.3, ul_density=0.2, server_lr=0.7, server_batch=3)
    n = fed.flat.numel
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct magnitudes: no ties, so the hand mask is unambiguous
        fed.server.copy_(torch.randn(n, generator=gen))
    s0 = fed.server.detach().numpy().copy()
    offsets = {c: torch.randn(n, generator=torch.Generator().manual_seed(100 + c)) for c in range(cfg.clients)}
    received = {}

    def fake_train(rnd, client, start, grad_mask, extras=None):
        received[client] = start.clone()
        return start + offsets[client], {"loss_sum": 0.0, "correct": 0, "count": 1, "epochs": 1}

    monkeypatch.setattr(fed.worker, "train_client", fake_train)
    sampled = fed.sample_clients(0)
    stats = fed.run_round(0)

    dl_mask = topk_by_sorting(s0, 0.3)
    start = s0 * dl_mask
    assert sorted(received) == sampled and len(set(sampled)) == 3
    for c in sampled:
        np.testing.assert_array_equal(received[c].numpy(), start)
    uploads = []
    for c in sampled:
        delta = start - (start + offsets[c].numpy())  # update = server ⊙ mask − client
        uploads.append(delta * topk_by_sorting(delta, 0.2))
    expected = s0 - 0.7 * np.mean(uploads, axis=0)
    np.testing.assert_allclose(fed.server.detach().numpy(), expected, rtol=1e-6, atol=1e-6)

    k_dl, k_ul = int(n * 0.3), int(n * 0.2)
    assert stats["bytes_down"] == 3 * (4 * k_dl + min(math.ceil(n / 8), 4 * k_dl))
    assert stats["bytes_up"] == 3 * (4 * k_ul + min(math.ceil(n / 8), 4 * k_ul))
    assert stats["update_norm"] == pytest.approx(np.mean([np.linalg.norm(u) for u in uploads]), rel=1e-5)


def test_dense_round_is_fedavg_of_client_models(tiny_overrides, monkeypatch):
    cfg, fed = build(tiny_overrides, server_lr=1.0)
    s0 = fed.server.detach().clone()
    n = fed.flat.numel
    clients_after = {}

    def fake_train(rnd, client, start, grad_mask, extras=None):
        assert torch.equal(start, s0)
        clients_after[client] = start + torch.randn(n, generator=torch.Generator().manual_seed(client))
        return clients_after[client], {"loss_sum": 0.0, "correct": 0, "count": 1, "epochs": 1}

    monkeypatch.setattr(fed.worker, "train_client", fake_train)
    stats = fed.run_round(0)
    mean_model = torch.stack(list(clients_after.values())).mean(0)
    torch.testing.assert_close(fed.server.detach(), mean_model, rtol=1e-5, atol=1e-6)
    assert stats["bytes_down"] == stats["bytes_up"] == cfg.server_batch * 4 * n


@pytest.mark.parametrize("client_freeze", [False, True])
def test_local_step_is_minus_lr_times_gradient(tiny_overrides, client_freeze):
    """One local SGD step from the masked download: update = lr · ∇loss (⊙ mask if client_freeze)."""
    cfg, fed = build(tiny_overrides, client_batch=10_000, client_lr=0.3, dl_density=0.5, client_freeze=client_freeze)
    no_dropout(fed.model)
    mask = fed.server_state.download_mask(0, 0.5, cfg.server_freeze)
    start = fed.server_state.masked(mask)
    grad_mask = fed.flat.split(mask.float()) if client_freeze else None
    client = 0
    after, stats = fed.worker.train_client(0, client, start, grad_mask)

    fed.flat.write(start)  # reference gradient, computed directly on the client's whole data
    fed.model.train()
    batch = fed.task.train.batch(fed.clients[client])
    logits = fed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    grads = torch.autograd.grad(F.cross_entropy(logits, batch["labels"]), fed.flat.params)
    grad = torch.cat([g.reshape(-1) for g in grads])
    if client_freeze:
        grad = grad * mask
        assert torch.equal((start - after)[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(start - after, 0.3 * grad, rtol=1e-4, atol=1e-7)
    assert stats["count"] == len(fed.clients[client])


def test_server_freeze_keeps_the_round_one_mask(tiny_overrides):
    cfg, fed = build(tiny_overrides, dl_density=0.4, server_freeze=True)
    assert fed.plan_round(0).plans[0].download is None  # first round dense
    fed.run_round(0)
    s1 = fed.server.detach().clone()
    m1 = fed.plan_round(1).plans[0].download
    assert np.array_equal(m1.numpy(), topk_by_sorting(s1.numpy(), 0.4)) and int(m1.sum()) == int(fed.flat.numel * 0.4)
    fed.run_round(1)
    with torch.no_grad():
        fed.server.mul_(-3).add_(torch.randn_like(fed.server))  # server changes...
    assert torch.equal(fed.plan_round(5).plans[0].download, m1)  # ...the mask does not


def test_sampling_and_local_order_do_not_depend_on_visit_order(tiny_overrides):
    _, fed = build(tiny_overrides)
    a = fed.sample_clients(4)
    assert a == fed.sample_clients(4) and a == sorted(a) and len(set(a)) == len(a)
    first = [b["labels"].tolist() for b in fed.worker.client_batches(2, 1)]
    list(fed.worker.client_batches(2, 0))  # visiting another client first changes nothing
    assert first == [b["labels"].tolist() for b in fed.worker.client_batches(2, 1)]
