"""Server optimizers' first two steps, the schedule, FedProx and early stopping, by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

import config
import train_lora
from flasc.client.optimizers import proximal_grad_
from flasc.federation.optimizers import SERVER_OPTIMIZERS, server_schedule

LR, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3
X0 = [1.0, -2.0]
GRADS = [[0.5, 0.1], [-0.3, 0.4]]


def expected(name):
    """Reddi et al. (2021) Algorithm 2 with Δ = −g, written out per coordinate."""
    xs = []
    for i, x in enumerate(X0):
        m = v = 0.0
        for g in (gr[i] for gr in GRADS):
            if name == "sgd":
                x -= LR * g
                continue
            if name == "sgdm":
                m = B1 * m + g
                x -= LR * m
                continue
            m = B1 * m + (1 - B1) * g
            if name == "adam":
                v = B2 * v + (1 - B2) * g * g
            elif name == "adagrad":
                v = v + g * g
            elif name == "yogi":
                v = v - (1 - B2) * g * g * math.copysign(1.0, v - g * g) if v != g * g else v
            x -= LR * m / (math.sqrt(v) + TAU)
        xs.append(x)
    return xs


@pytest.mark.parametrize("name", ["sgd", "sgdm", "adam", "adagrad", "yogi"])
def test_server_optimizer_first_two_steps(name):
    p = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float64))
    opt = SERVER_OPTIMIZERS[name]([p], SimpleNamespace(server_lr=LR, beta1=B1, beta2=B2, tau=TAU))
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert p.detach().tolist() == pytest.approx(expected(name), rel=1e-12)


def test_yogi_first_step_by_hand():
    # v0 = 0 < g² so v1 = (1 − β2) g²; m1 = (1 − β1) g
    g = 0.5
    v1 = (1 - B2) * g * g
    want = X0[0] - LR * (1 - B1) * g / (math.sqrt(v1) + TAU)
    p = torch.nn.Parameter(torch.tensor([X0[0]], dtype=torch.float64))
    opt = SERVER_OPTIMIZERS["yogi"]([p], SimpleNamespace(server_lr=LR, beta1=B1, beta2=B2, tau=TAU))
    p.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()
    assert float(p.detach()) == pytest.approx(want, rel=1e-12)


def test_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = server_schedule(opt, "cosine", 4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)])
    const = torch.optim.SGD([p], lr=2.0)
    s2 = server_schedule(const, "constant", 4)
    for _ in range(3):
        const.step()
        s2.step()
    assert const.param_groups[0]["lr"] == 2.0


def test_fedprox_gradient_is_mu_times_distance_to_global():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    anchor = torch.tensor([0.5, 2.5, 0.0])
    mu = 0.3
    loss = (w**2).sum()
    loss.backward()
    data_grad = w.grad.clone()
    proximal_grad_([w], [anchor], mu)
    torch.testing.assert_close(w.grad - data_grad, mu * (w.detach() - anchor))
    # and it is the gradient of the proximal term (mu/2)·||w − w_global||²
    w2 = torch.nn.Parameter(w.detach().clone())
    (mu / 2 * ((w2 - anchor) ** 2).sum()).backward()
    torch.testing.assert_close(w.grad - data_grad, w2.grad)


def test_fedprox_changes_local_training_but_not_its_first_step(tiny_overrides):
    def train(mu, batch):
        cfg = config.load_config(overrides={**tiny_overrides, "mu": mu, "client_batch": batch})
        fed = train_lora.build(cfg, torch.device("cpu"))
        start = fed.server.detach().clone()
        return fed.worker.train_client(0, 0, start, None)[0] - start

    one_step = [train(mu, 10_000) for mu in (0.0, 5.0)]
    torch.testing.assert_close(one_step[0], one_step[1])  # w = w_global: no pull yet
    many = [train(mu, 2) for mu in (0.0, 5.0)]
    assert many[1].norm() < many[0].norm()  # the pull keeps clients closer


def test_early_stopping_stops_after_an_accurate_epoch(tiny_overrides):
    def epochs(threshold):
        cfg = config.load_config(overrides={**tiny_overrides, "client_epochs": 3, "early_stopping": threshold})
        fed = train_lora.build(cfg, torch.device("cpu"))
        return fed.worker.train_client(0, 0, fed.server.detach().clone(), None)[1]["epochs"]

    assert epochs(0.0) == 3
    assert epochs(1e-9) == 1


@pytest.mark.parametrize("client_opt", ["sgd", "adam", "adagrad", "yogi"])
def test_client_optimizers_train(tiny_overrides, client_opt):
    cfg = config.load_config(overrides={**tiny_overrides, "client_opt": client_opt, "client_lr": 0.01})
    fed = train_lora.build(cfg, torch.device("cpu"))
    start = fed.server.detach().clone()
    after, stats = fed.worker.train_client(0, 0, start, None)
    assert stats["count"] == len(fed.clients[0]) and not torch.equal(after, start)


def test_client_momentum_zero_is_plain_sgd_by_hand():
    from flasc.client.local import LocalSettings
    from flasc.client.optimizers import CLIENT_OPTIMIZERS

    hyper = LocalSettings.of(config.load_config(overrides={"client_momentum": 0.0})).hyper
    w = torch.zeros(3, requires_grad=True)
    opt = CLIENT_OPTIMIZERS["sgd"]([w], 0.1, hyper)
    for g in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0, 0.0])):
        w.grad = g
        opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.2, -0.1, -0.3]))  # w − lr (g1 + g2)
    assert LocalSettings.of(config.load_config()).hyper.momentum == 0.9  # the FLASC seeds' default
    assert config.load_config("scaffold").client_momentum == 0.0
