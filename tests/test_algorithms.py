"""The federated-LoRA baselines (flasc/algorithms/) against independent computations: clients whose
trained parameters are set by the test (start + a known offset), so every aggregate can be worked
out here from the clients' factors with plain matrix algebra."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT  # noqa: F401  (sys.path)

import config
import train_lora
from flasc import algorithms
from flasc.algorithms import hetlora
from flasc.client.state_store import ClientStateStore
from flasc.federation import tiers
from flasc.models import training_mode
from flasc.tasks.evaluation import logits_of


def build(tiny_overrides, **extra):
    cfg = config.load_config(overrides={**tiny_overrides, **extra})
    return cfg, train_lora.build(cfg, torch.device("cpu"))


def fake_clients(fed, monkeypatch, scale=0.05):
    """Each client 'trains' to start + a fixed random offset on the entries it may train;
    returns what each client started from and ended with."""
    seen = {}

    def fake_train(rnd, client, start, grad_mask, extras=None):
        g = torch.Generator().manual_seed(1000 * rnd + client)
        offset = scale * torch.randn(start.shape, generator=g)
        if grad_mask is not None:
            offset = offset * torch.cat([m.reshape(-1) for m in grad_mask])
        seen[client] = (start.clone(), start + offset)
        return start + offset, {"loss_sum": 0.0, "correct": 0, "count": 1, "epochs": 1, "steps": 1}

    monkeypatch.setattr(fed.worker, "train_client", fake_train)
    return seen


def factors(fed, pair, vector):
    named = fed.flat.named(vector)
    a = pair.frozen_a if pair.a is None else named[pair.a]
    return a.double(), named[pair.b].double()


def weights_of(cfg, fed, ids):
    sizes = np.array([len(fed.clients[c]) for c in ids], float)
    return sizes / sizes.sum() if cfg.weighting == "num_examples" else np.full(len(ids), 1 / len(ids))


def test_the_algorithm_option_accepts_exactly_the_registry():
    for name in algorithms.ALGORITHMS:
        assert config.coerce("algorithm", name) == name
    with pytest.raises(config.ConfigError, match="algorithm: 'fedavgx' is out of range; expected one of fedavg, "):
        config.coerce("algorithm", "fedavgx")


def test_fedex_aggregate_is_the_mean_of_the_clients_weights(tiny_overrides, monkeypatch):
    cfg, fed = build(tiny_overrides, algorithm="fedex", server_batch=3)
    seen = fake_clients(fed, monkeypatch)
    pairs = fed.aggregator.pairs
    w0 = {p.name: p.module.get_base_layer().weight.detach().double().clone() for p in pairs}
    for rnd in range(2):  # the second round starts from a changed base: residuals accumulate
        before = {p.name: p.module.get_base_layer().weight.detach().double().clone() for p in pairs}
        fed.run_round(rnd)
        ids = sorted(seen)
        w = weights_of(cfg, fed, ids)
        for pair in pairs:
            mean_weight = sum(
                wk * (before[pair.name] + pair.scaling * (b @ a))
                for wk, (a, b) in zip(w, (factors(fed, pair, seen[c][1]) for c in ids))
            )
            a_new, b_new = factors(fed, pair, fed.server.detach())
            effective = pair.module.get_base_layer().weight.detach().double() + pair.scaling * (b_new @ a_new)
            torch.testing.assert_close(effective, mean_weight, rtol=0, atol=1e-6)
            # and the factors are FedAvg's: the plain means of A_k and B_k
            torch.testing.assert_close(
                b_new, sum(wk * factors(fed, pair, seen[c][1])[1] for wk, c in zip(w, ids)), rtol=0, atol=1e-6
            )
        seen.clear()
    assert any(not torch.equal(w0[p.name], p.module.get_base_layer().weight.detach().double()) for p in pairs)


def test_flora_folds_the_stacked_module_into_the_base(tiny_overrides, monkeypatch):
    cfg, fed = build(tiny_overrides, algorithm="flora", weighting="num_examples", server_batch=3)
    seen = fake_clients(fed, monkeypatch)
    pairs = fed.aggregator.pairs
    before = {p.name: p.module.get_base_layer().weight.detach().double().clone() for p in pairs}
    server_lora_before = fed.server.detach()[fed.algorithm.lora].clone()
    fed.run_round(0)
    ids = sorted(seen)
    p_k = weights_of(cfg, fed, ids)
    starts_a = [factors(fed, pairs[0], seen[c][0])[0] for c in ids]
    assert not torch.equal(starts_a[0], starts_a[1])  # fresh, different A per client
    assert all(float(factors(fed, pairs[0], seen[c][0])[1].abs().max()) == 0 for c in ids)  # B = 0
    for pair in pairs:
        fac = [factors(fed, pair, seen[c][1]) for c in ids]
        a_stacked = torch.cat([pk * a for pk, (a, _) in zip(p_k, fac)], dim=0)  # p_k scales A only
        b_stacked = torch.cat([b for _, b in fac], dim=1)
        change = pair.module.get_base_layer().weight.detach().double() - before[pair.name]
        torch.testing.assert_close(change, pair.scaling * (b_stacked @ a_stacked), rtol=0, atol=1e-6)
    # the server's factors are untouched (B stays 0): the global model is the new base and the head
    torch.testing.assert_close(fed.server.detach()[fed.algorithm.lora], server_lora_before)


@pytest.mark.parametrize("split", ["b", "balanced"])
def test_flexlora_factors_are_the_truncated_svd_at_every_tier_rank(tiny_overrides, monkeypatch, split):
    """split b: σ in B, A orthonormal; balanced: √σ on each side, B's columns and A's rows equally
    long (√(σ_j / s))."""
    cfg, fed = build(
        tiny_overrides, algorithm="flexlora", weighting="num_examples", tiers=2, server_batch=4, flexlora_split=split
    )
    seen = fake_clients(fed, monkeypatch)
    fed.run_round(0)
    ids = sorted(seen)
    p_k = weights_of(cfg, fed, ids)
    for pair in fed.aggregator.pairs:
        target = sum(
            pk * pair.scaling * (b @ a) for pk, (a, b) in zip(p_k, (factors(fed, pair, seen[c][1]) for c in ids))
        ).numpy()
        u, s, vt = np.linalg.svd(target)
        for rank in (1, 4):  # tier 0 downloads rank 1, tier 1 rank 4
            a, b = factors(fed, pair, fed.server_state.masked(fed.tier_masks[0 if rank == 1 else 1]))
            best = (u[:, :rank] * s[:rank]) @ vt[:rank]
            np.testing.assert_allclose((pair.scaling * (b @ a)).numpy(), best, atol=1e-6)
        a, b = factors(fed, pair, fed.server.detach())
        lengths = np.ones(a.shape[0]) if split == "b" else np.sqrt(s[: a.shape[0]] / pair.scaling)
        np.testing.assert_allclose((a @ a.T).numpy(), np.diag(lengths**2), atol=1e-5)  # orthogonal rows
        if split == "balanced":
            np.testing.assert_allclose(np.linalg.norm(b.numpy(), axis=0), lengths, atol=1e-5)
        assert all(float(row[row.abs().argmax()]) > 0 for row in a)  # the sign convention


def test_flexlora_factors_do_not_depend_on_the_svd_sign_choice(monkeypatch):
    """LAPACK and cuSOLVER may return any sign for each singular pair; the factors are the same."""
    from flasc.algorithms import flexlora

    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = flexlora.svd_factors(target, 3, 0.5)
    svd = torch.linalg.svd
    flips = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    monkeypatch.setattr(
        torch.linalg,
        "svd",
        lambda m, full_matrices: (lambda u, s, vh: (u * flips, s, vh * flips[:, None]))(
            *svd(m, full_matrices=full_matrices)
        ),
    )
    flipped = flexlora.svd_factors(target, 3, 0.5)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(reference, flipped))
    b, a, _ = reference
    u, s, vh = svd(target, full_matrices=False)
    assert torch.allclose(0.5 * b @ a, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)


def test_flexlora_components_beyond_the_aggregates_rank_are_fixed_fresh_components():
    """A rank-2 aggregate truncated to rank 4: the SVD leaves components 3 and 4 arbitrary (they
    follow float noise: what made CPU and GPU runs differ). They are B = 0 and seeded orthonormal A
    rows, the same under a perturbation at float32 rounding level."""
    from flasc.algorithms import flexlora

    g = torch.Generator().manual_seed(1)
    target = torch.randn(8, 2, generator=g) @ torch.randn(2, 10, generator=g)
    noisy = target + 1e-7 * torch.randn(8, 10, generator=g)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    b, a, _ = flexlora.svd_factors(target, 4, 2.0, gen())
    b2, a2, _ = flexlora.svd_factors(noisy, 4, 2.0, gen())
    assert torch.allclose(a, a2, atol=1e-4) and torch.allclose(b, b2, atol=1e-4)
    assert float(b[:, 2:].abs().max()) == 0.0  # fresh components: B = 0
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-6)  # A's rows orthonormal
    assert torch.allclose(2.0 * b @ a, target, atol=1e-5)  # the product is the target
    other = flexlora.orthonormal_complement(a[:2], 2, torch.Generator().manual_seed(8))
    assert not torch.allclose(other.float(), a[2:], atol=1e-3)  # drawn from the generator


def test_flexlora_keeps_every_component_above_float_rounding():
    """A small but real component (σ₂ = 1e-5 σ₁, far above float32 rounding of a 32 × 32 SVD,
    eps·32·σ₁ ≈ 4e-6 σ₁) is part of the best rank-4 approximation and is kept (a cutoff at
    1e-4 σ₁ dropped it)."""
    from flasc.algorithms import flexlora

    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    sigma = torch.zeros(32, dtype=torch.float64)
    sigma[:2] = torch.tensor([1.0, 1e-5])
    target = ((q1 * sigma) @ q2.T).float()
    b, a, _ = flexlora.svd_factors(target, 4, 0.5, torch.Generator().manual_seed(0))
    u, s, vt = np.linalg.svd(target.double().numpy())
    best = (u[:, :4] * s[:4]) @ vt[:4]
    assert np.abs((0.5 * b @ a).double().numpy() - best).max() < 1e-7  # the 1e-5 component is there
    assert float(b[:, 1].norm()) > 0 and float(b[:, 2:].abs().max()) == 0.0  # rounding-level ones are fresh


def test_hetlora_zero_pads_and_weights_by_the_norm_of_each_product(tiny_overrides, monkeypatch):
    cfg, fed = build(tiny_overrides, algorithm="hetlora", tiers=2, server_batch=4)
    seen = fake_clients(fed, monkeypatch)
    fed.run_round(0)
    ids = sorted(seen)
    for pair in fed.aggregator.pairs:
        fac = [factors(fed, pair, seen[c][1]) for c in ids]
        for c, (a, b) in zip(ids, fac):  # a tier-0 client holds rank 1: everything past it is zero
            if fed.client_tier[c] == 0:
                assert float(a[1:].abs().max()) == 0 and float(b[:, 1:].abs().max()) == 0
        norms = np.array([float(torch.linalg.matrix_norm(pair.scaling * (b @ a))) for a, b in fac])
        p = norms / norms.sum()
        a_new, b_new = factors(fed, pair, fed.server.detach())
        np.testing.assert_allclose(a_new.numpy(), sum(pk * a.numpy() for pk, (a, _) in zip(p, fac)), atol=1e-6)
        np.testing.assert_allclose(b_new.numpy(), sum(pk * b.numpy() for pk, (_, b) in zip(p, fac)), atol=1e-6)


def test_hetlora_weights_sum_to_one_and_fall_back_when_every_norm_is_zero():
    fallback = torch.tensor([0.25, 0.75])
    p = hetlora.hetlora_weights([torch.ones(2, 2), 3 * torch.ones(2, 2)], fallback)
    assert torch.allclose(p, torch.tensor([0.25, 0.75])) and float(p.sum()) == pytest.approx(1)
    assert torch.equal(hetlora.hetlora_weights([torch.zeros(2, 2)] * 2, fallback), fallback)


def test_hetlora_pruning_shrinks_the_rank_of_a_client_whose_tail_shrank(tiny_overrides, monkeypatch):
    cfg, fed = build(
        tiny_overrides, algorithm="hetlora", hetlora_prune=True, hetlora_gamma=0.5, server_batch=2, clients=2
    )
    algo = fed.algorithm

    def shrinking(rnd, client, start, grad_mask, extras):
        assert extras.penalty is not None
        end = start.clone()
        for pair in fed.aggregator.pairs:  # client 0 shrinks its tail, client 1 grows it
            named = fed.flat.named(end)
            named[pair.b][:, 2:] = (0.5 if client == 0 else 2.0) * named[pair.b][:, 2:] + 0.01
        return end, {"loss_sum": 0.0, "correct": 0, "count": 1, "epochs": 1, "steps": 1}

    with torch.no_grad():
        fed.server.add_(0.1)  # a non-zero tail to start from
    monkeypatch.setattr(fed.worker, "train_client", shrinking)
    fed.run_round(0)
    assert algo.rank_of(0, 0) == 2 and algo.rank_of(1, 0) == cfg.lora_rank  # floor(0.5 * 4) = 2
    plan = tiers.plans(cfg, fed.server_state, fed.flat, fed.aggregator.pairs, 1, 1.0, 1.0)[0]
    job = algo.prepare(1, train_lora.ClientJob(0, 0, fed.server.detach().clone(), plan), None)
    a, b = factors(fed, fed.aggregator.pairs[0], job.start)
    assert float(b[:, 2:].abs().max()) == 0 and float(a[2:].abs().max()) == 0 and float(a[:2].abs().max()) > 0


def test_fedsa_keeps_each_clients_b_and_head_and_averages_a(tiny_overrides, monkeypatch, tmp_path):
    cfg, fed = build(tiny_overrides, algorithm="fedsa", clients=4, server_batch=2)
    fed.attach_store(tmp_path)
    seen = fake_clients(fed, monkeypatch)
    local, shared = fed.algorithm.local, fed.algorithm.shared
    initial = fed.server.detach().clone()
    trained = {}
    for rnd in range(4):
        server_before = fed.server.detach().clone()
        fed.run_round(rnd)
        ids = sorted(seen)
        w = weights_of(cfg, fed, ids)
        for c in ids:
            start, end = seen[c]
            # the client starts from the server's A and its own B and head (initial ones the first time)
            torch.testing.assert_close(start[shared], server_before[shared])
            torch.testing.assert_close(start[local], trained.get(c, initial)[local])
            trained[c] = end
            torch.testing.assert_close(fed.store.get(c), end[local])
        expected_a = sum(wk * seen[c][1][shared] for wk, c in zip(w, ids))
        torch.testing.assert_close(fed.server.detach()[shared], expected_a, rtol=0, atol=1e-6)
        seen.clear()
    assert len(trained) >= 3


def test_scaffold_first_two_rounds_by_hand(tiny_overrides):
    """Algorithm 1 of the paper (option II) written out here on the real tiny model: local steps
    y <- y - lr (g - c_i + c) with the same momentum SGD, then the server's updates of x and c."""
    cfg, fed = build(
        tiny_overrides,
        algorithm="scaffold",
        server_lr=0.8,
        clients=4,
        server_batch=2,
        lora_dropout=0.0,
        base_dropout=False,
        client_epochs=1,
    )
    n_clients, lr = cfg.clients, cfg.client_lr
    x = fed.server.detach().clone()
    c = torch.zeros_like(x)
    c_i = {k: torch.zeros_like(x) for k in range(n_clients)}
    worker, flat, model = fed.worker, fed.flat, fed.model
    objective = fed.task.objective

    def local(rnd, client):
        flat.write(x)
        training_mode(model, False)
        buf = [torch.zeros_like(p) for p in flat.params]
        steps = 0
        offset = flat.split(c - c_i[client])
        for batch in worker.client_batches(rnd, client):
            loss = objective.loss(logits_of(model, batch, fed.device, False), batch)
            grads = torch.autograd.grad(loss, flat.params, allow_unused=True)
            with torch.no_grad():
                for p, g, o, m in zip(flat.params, grads, offset, buf):
                    g = (torch.zeros_like(p) if g is None else g) + o
                    m.mul_(0.9).add_(g)  # torch SGD momentum 0.9, dampening 0
                    p.sub_(lr * m)
            steps += 1
        return flat.read(), steps

    for rnd in range(2):
        sampled = fed.sample_clients(rnd)
        dys, dcs = [], []
        for k in sampled:
            y, steps = local(rnd, k)
            new_ci = c_i[k] - c + (x - y) / (steps * lr)
            dys.append(y - x)
            dcs.append(new_ci - c_i[k])
            c_i[k] = new_ci
        x = x + cfg.server_lr * torch.stack(dys).mean(0)
        c = c + len(sampled) / n_clients * torch.stack(dcs).mean(0)
        fed.run_round(rnd)
        torch.testing.assert_close(fed.server.detach(), x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fed.algorithm.control, c, rtol=1e-5, atol=1e-6)
    # c is the mean of every client's c_i (those never sampled hold 0), as the paper keeps it
    torch.testing.assert_close(fed.algorithm.control, torch.stack(list(c_i.values())).mean(0), rtol=1e-5, atol=1e-6)


def test_client_state_store_is_lazy_and_protects_the_checkpointed_states(tmp_path):
    store = ClientStateStore(tmp_path, clients=5000, numel=8)
    assert len(store) == 0 and store.get(4999) is None
    store.put(4999, torch.arange(8.0))
    assert len(store) == 1 and torch.equal(store.get(4999), torch.arange(8.0))
    saved = store.state_dict()
    store.flush()
    store.committed()
    store.put(4999, torch.ones(8))  # after the checkpoint: a new state, twice
    store.put(4999, 2 * torch.ones(8))
    assert torch.equal(store.get(4999), 2 * torch.ones(8))
    # a crash now: the resumed run reads the checkpoint's view, which was never overwritten
    again = ClientStateStore(tmp_path, clients=5000, numel=8)
    again.load_state_dict(saved)
    assert torch.equal(again.get(4999), torch.arange(8.0)) and again.get(0) is None
    # the file holds two slots of the clients written, not of all 5000 (sparse on disk)
    assert (tmp_path / "client_state.bin").stat().st_size <= 2 * 5000 * 8 * 4
    store.close(), again.close()


def test_personalised_evaluation_holds_out_a_seeded_disjoint_fraction(tiny_overrides):
    cfg, fed = build(tiny_overrides, eval_personalized=True, local_test_fraction=0.25)
    plain = train_lora.make_clients(cfg, fed.task)
    for c, (train, test) in enumerate(zip(fed.clients, fed.local_tests)):
        whole = plain[c]
        assert sorted(torch.cat([train, test]).tolist()) == sorted(whole.tolist())
        assert len(test) == int(np.floor(0.25 * len(whole) + 0.5)) or len(whole) < 2
        assert not set(train.tolist()) & set(test.tolist())
    again = train_lora.hold_out_local_tests(cfg, plain)[1]
    assert all(torch.equal(a, b) for a, b in zip(again, fed.local_tests))


def test_personalised_accuracy_of_fedsa_scores_each_clients_own_model(tiny_overrides, monkeypatch, tmp_path):
    cfg, fed = build(tiny_overrides, algorithm="fedsa", eval_personalized=True, clients=4, server_batch=2)
    fed.attach_store(tmp_path)
    fake_clients(fed, monkeypatch, scale=0.5)
    fed.run_round(0)
    metrics = fed.evaluation.personal(fed.server_state)
    own, glob = [], []
    for c, idx in enumerate(fed.local_tests):  # by hand: each client's model on its examples
        state = fed.store.get(c)
        vector = fed.server.detach().clone()
        vector[fed.algorithm.local] = fed.algorithm.initial_local if state is None else state
        for target, out in ((vector, own), (fed.server.detach(), glob)):
            fed.flat.write(target)
            with torch.no_grad():
                fed.model.eval()
                batch = fed.task.train.batch(idx)
                logits = logits_of(fed.model, batch, fed.device, False)
                out.append(float((logits.argmax(-1) == batch["labels"]).float().mean()))
    assert metrics["personal_accuracy_mean"] == pytest.approx(np.mean(own))
    assert metrics["personal_accuracy_std"] == pytest.approx(np.std(own))
    assert metrics["personal_global_accuracy_mean"] == pytest.approx(np.mean(glob))
    assert metrics["personal_clients"] == 4


def test_stateless_personal_model_is_the_global_model(tiny_overrides):
    cfg, fed = build(tiny_overrides, eval_personalized=True)
    metrics = fed.evaluation.personal(fed.server_state)
    assert metrics["personal_accuracy_mean"] == metrics["personal_global_accuracy_mean"]


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"algorithm": "fedsa", "merging_strategy": "ties"}, "merging_strategy"),
        ({"algorithm": "fedex", "dl_density": 0.5}, "dl_density"),
        ({"algorithm": "scaffold", "ul_density": 0.5}, "ul_density"),
        ({"algorithm": "flora", "noise_multiplier": 1.0, "l2_clip_norm": 1.0}, "noise_multiplier"),
        ({"algorithm": "flexlora", "server_opt": "adam"}, "server_opt"),
        ({"algorithm": "fedsa", "freeze_a": True}, "freeze_a"),
        ({"algorithm": "rolora", "freeze_a": True}, "freeze_a"),
        ({"algorithm": "rolora", "server_opt": "sgdm"}, "server_opt"),
        ({"algorithm": "fedsvd", "server_opt": "adam"}, "server_opt"),
        ({"algorithm": "fedsvd", "tiers": 2}, "tiers"),
        ({"algorithm": "fedsvd", "freeze_a": True}, "freeze_a"),
        ({"algorithm": "lorafair", "server_opt": "adam"}, "server_opt"),
        ({"algorithm": "fedsb", "tiers": 2}, "tiers"),
        ({"algorithm": "fedsb", "freeze_a": True}, "freeze_a"),
        ({"algorithm": "fedsb", "use_dora": True}, "use_dora"),
        ({"algorithm": "fedsb", "init_lora_weights": "gaussian"}, "init_lora_weights"),
        ({"algorithm": "fedsb", "lora_plus_ratio": 4.0}, "lora_plus_ratio"),
        ({"algorithm": "fedsb", "merge_space": "product"}, "merging_strategy"),
        (
            {"algorithm": "fedsb", "fedsb_init_data": "clients", "noise_multiplier": 1.0, "l2_clip_norm": 1.0},
            "fedsb_init_data",
        ),
        ({"algorithm": "lorafair", "tiers": 2}, "tiers"),
        ({"algorithm": "lorafair", "noise_multiplier": 1.0, "l2_clip_norm": 1.0}, "noise_multiplier"),
        ({"algorithm": "fedex", "tiers": 2}, "tiers"),
        ({"algorithm": "hetlora", "tiers": 2, "syshet": "density"}, "syshet"),
        ({"algorithm": "fedsa", "lora_rank": 0}, "algorithm"),
        ({"algorithm": "fedex", "shadow_strategies": ["ties"]}, "shadow_strategies"),
        ({"hetlora_prune": True}, "hetlora_prune"),
        ({"algorithm": "scaffold", "l2_clip_norm": 1.0}, "l2_clip_norm"),
        *[
            ({"algorithm": a, "dp_divide_by_clip": True, "l2_clip_norm": 1.0}, "dp_divide_by_clip")
            for a in ("scaffold", "fedex", "flora", "flexlora", "hetlora")
        ],
    ],
)
def test_meaningless_combinations_are_refused_naming_the_key(tiny_overrides, extra, key):
    with pytest.raises(config.ConfigError) as e:
        config.load_config(overrides={**tiny_overrides, **extra})
    assert str(e.value).startswith(f"{key}:")


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsa"])
def test_dp_divide_by_clip_runs_where_the_aggregate_is_a_mean_of_clipped_updates(tiny_overrides, algorithm):
    """fedavg and fedsa: the pseudo-gradient is the mean of the clipped updates, so dividing it by C
    only scales the server step: with sgd at server_lr C it is the step without dp_divide_by_clip."""
    import copy

    clip = 0.5
    runs = {}
    for divide in (False, True):
        cfg, fed = build(
            tiny_overrides,
            algorithm=algorithm,
            l2_clip_norm=clip,
            dp_divide_by_clip=divide,
            server_lr=clip if divide else 1.0,
        )
        fed.run_round(0)
        runs[divide] = copy.deepcopy(fed.server.detach())
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-7)


def test_planning_a_round_leaves_no_trace(tiny_overrides, monkeypatch):
    """plan_round is pure: planning a round (and abandoning it, as an interrupt during local training
    does) changes nothing a checkpoint saves, so a resumed run counts what an uninterrupted one does."""
    for extra in ({"algorithm": "fedex"}, {"algorithm": "flora"}, {"server_freeze": True, "dl_density": 0.5}):
        cfg, fed = build(tiny_overrides, **extra)
        fake_clients(fed, monkeypatch)
        fed.run_round(0)
        before = fed.state()
        for rnd in (1, 1, 2):
            fed.plan_round(rnd)
        after = fed.state()
        assert repr(after) == repr(before), extra


def test_an_interrupted_fedex_round_resumes_with_the_bytes_of_an_uninterrupted_run(tiny_overrides, monkeypatch):
    """An interrupt during local training (ckpt_freq 0: the last completed round is checkpointed then):
    the resumed run's catch-up downloads are those of the uninterrupted run."""
    import json
    import signal

    from flasc.client.worker import ClientWorker
    from flasc.runtime.interrupts import Interrupted

    overrides = {**tiny_overrides, "algorithm": "fedex", "server_rounds": 4, "ckpt_freq": 0, "server_batch": 2}
    reference = train_lora.train(config.load_config(overrides={**overrides, "name": "ref"}))
    real = ClientWorker.train_client
    fired = []

    def interrupted_in_round_3(self, rnd, *args):
        if rnd == 2 and not fired:
            fired.append(rnd)
            raise Interrupted(signal.SIGTERM)
        return real(self, rnd, *args)

    monkeypatch.setattr(ClientWorker, "train_client", interrupted_in_round_3)
    cfg = config.load_config(overrides={**overrides, "name": "run"})
    with pytest.raises(Interrupted):
        train_lora.train(cfg)
    run_dir = reference.parent / "run"
    assert fired and (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()
    train_lora.train(cfg, resume_dir=run_dir)
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (reference, run_dir))
    assert got["bytes_down"] == ref["bytes_down"] and got["bytes_up"] == ref["bytes_up"]
    assert got["test_accuracy"] == ref["test_accuracy"]


def test_fedsa_upload_sparsified_over_the_a_entries_only(tiny_overrides, monkeypatch, tmp_path):
    cfg, fed = build(tiny_overrides, algorithm="fedsa", ul_density=0.5, clients=4, server_batch=2)
    fed.attach_store(tmp_path)
    fake_clients(fed, monkeypatch)
    stats = fed.run_round(0)
    n_a = int(fed.algorithm.shared.sum())
    k = int(n_a * 0.5)
    from flasc.federation.communication import message_bytes

    assert stats["bytes_up"] == 2 * message_bytes(n_a, k)
    assert stats["bytes_down"] == 2 * 4 * n_a


@pytest.mark.parametrize("algorithm", ["fedex", "flora"])
def test_saved_model_with_its_base_delta_reproduces_the_final_evaluation(tiny_overrides, algorithm):
    import json

    from data import load_task
    from flasc import models
    from flasc.tasks.evaluation import evaluate

    cfg = config.load_config(overrides={**tiny_overrides, "algorithm": algorithm, "server_rounds": 2, "client_lr": 0.5})
    run_dir = train_lora.train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "adapter" / "base_delta.pt").is_file()
    tok, tag = models.load_tokenizer(cfg)
    task = load_task(cfg.dataset, cfg.data_dir, lambda: (tok, tag), cfg.max_length)
    model = models.load_trained(cfg, run_dir / "adapter", task.num_labels, tok.pad_token_id)
    again = evaluate(model, task.test, task.objective, 64, torch.device("cpu"), False)
    assert again["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    # the loaded base weights are the built ones plus the saved delta, which is not zero
    delta = torch.load(run_dir / "adapter" / "base_delta.pt")
    fresh = models.build_model(cfg, task.num_labels, tok.pad_token_id)
    modules, fresh_modules = dict(model.named_modules()), dict(fresh.named_modules())
    assert delta and all(float(d.abs().max()) > 0 for d in delta.values())
    for name, d in delta.items():
        loaded = modules[name].get_base_layer().weight.detach()
        torch.testing.assert_close(loaded - fresh_modules[name].get_base_layer().weight.detach(), d, rtol=0, atol=1e-6)


def test_fedsa_local_head_false_shares_the_head_with_a(tiny_overrides):
    _, fed = build(tiny_overrides, algorithm="fedsa", local_head=False)
    head = ~fed.algorithm.lora
    assert bool(fed.algorithm.shared[head].all()) and not bool(fed.algorithm.local[head].any())
    _, kept = build(tiny_overrides, algorithm="fedsa")
    assert bool(kept.algorithm.local[head].all())


def test_hetlora_penalty_is_lambda_times_the_tail_norms_by_hand(tiny_overrides):
    cfg, fed = build(tiny_overrides, algorithm="hetlora", hetlora_prune=True, hetlora_lambda=0.25)
    named = dict(zip(fed.flat.names, fed.flat.params))
    with torch.no_grad():
        for p in fed.flat.params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    rank, cut = 4, 2
    expected = 0.25 * sum(
        float(named[p.b][:, 2:4].norm()) * float(named[p.a][2:4].norm()) for p in fed.aggregator.pairs
    )
    assert float(fed.algorithm.penalty(rank, cut)(named)) == pytest.approx(expected, rel=1e-6)


def test_rolora_alternates_b_and_a_and_its_average_is_the_mean_of_the_products(tiny_overrides, monkeypatch):
    """Rounds 1 and 3 train B (and the head) with A frozen, rounds 2 and 4 A (and the head) with B
    frozen; the server takes the weighted mean of what was trained, so s·B̄·A (and s·B·Ā) equals
    the weighted mean of the clients' products; each client sends the trained factor and the head."""
    cfg, fed = build(tiny_overrides, algorithm="rolora", clients=4, server_batch=3)
    seen = fake_clients(fed, monkeypatch)
    b_mask = torch.zeros(fed.flat.numel, dtype=torch.bool)
    for pair in fed.aggregator.pairs:
        fed.flat.named(b_mask)[pair.b][:] = True
    head = ~fed.algorithm.lora
    a_mask = fed.algorithm.lora & ~b_mask
    n = fed.flat.numel
    for rnd in range(4):
        before = fed.server.detach().clone()
        stats = fed.run_round(rnd)
        ids = sorted(seen)
        w = weights_of(cfg, fed, ids)
        trained, frozen = (b_mask, a_mask) if rnd % 2 == 0 else (a_mask, b_mask)
        for c in ids:
            start, end = seen[c]
            torch.testing.assert_close(start, before)  # everyone starts from the server's model
            assert torch.equal(end[frozen], start[frozen]) and not torch.equal(end[trained], start[trained])
        after = fed.server.detach()
        assert torch.equal(after[frozen], before[frozen])
        expected = sum(wk * seen[c][1].double() for wk, c in zip(w, ids))
        torch.testing.assert_close(after[trained | head].double(), expected[trained | head], rtol=0, atol=1e-6)
        for pair in fed.aggregator.pairs:
            a, b = factors(fed, pair, after)
            mean_of_products = sum(
                wk * (factors(fed, pair, seen[c][1])[1] @ factors(fed, pair, seen[c][1])[0]) for wk, c in zip(w, ids)
            )
            torch.testing.assert_close(b @ a, mean_of_products, rtol=0, atol=1e-6)
        assert stats["bytes_up"] == 3 * 4 * int((trained | head).sum())
        assert stats["bytes_down"] == 3 * 4 * n
        seen.clear()


def test_rolora_with_dp_noise_keeps_the_frozen_factor_and_noises_what_was_sent(tiny_overrides, monkeypatch):
    dp = {"noise_multiplier": 1.0, "l2_clip_norm": 1.0, "weighting": "uniform"}
    cfg, fed = build(tiny_overrides, algorithm="rolora", clients=4, server_batch=3, **dp)
    seen = fake_clients(fed, monkeypatch, scale=0.001)  # small enough that no update is clipped
    a_mask = fed.algorithm.lora & ~fed.algorithm.trains["b"]
    before = fed.server.detach().clone()
    fed.run_round(0)
    after, mean = fed.server.detach(), sum(seen[c][1] for c in seen) / 3
    assert torch.equal(after[a_mask], before[a_mask])
    assert float((after - mean)[~a_mask].abs().max()) > 0.01  # noise of std 1/3 on what was sent


@pytest.mark.parametrize("algorithm", ["rolora", "fedsb", "fedsvd", "lorafair"])
def test_a_stopped_run_of_a_2025_method_resumes_to_the_uninterrupted_run(tiny_overrides, monkeypatch, algorithm):
    """Stopped while round 3 trains (round 2 checkpointed), resumed: the same metrics and adapter
    (RoLoRA: the resumed run trains B in round 3 and A in round 4, as the uninterrupted one)."""
    from test_faults import argv_of, same_adapter, stopped_in_round, without_timing

    overrides = {**tiny_overrides, "algorithm": algorithm, "server_rounds": 4, "eval_freq": 1}
    assert train_lora.main(argv_of({**overrides, "name": "ref"})) == 0
    stopped_in_round(argv_of({**overrides, "name": "run"}), monkeypatch, 3)
    runs = Path(tiny_overrides["dir"])
    assert len(without_timing(runs / "run")) == 2
    assert train_lora.main(["--resume", str(runs / "run")]) == 0
    assert without_timing(runs / "run") == without_timing(runs / "ref")
    assert same_adapter(runs / "run", runs / "ref")


def test_fedsvd_trains_b_then_refactors_the_mean_product_with_an_orthonormal_a(tiny_overrides, monkeypatch):
    """Clients train B (and the head) from the global A; the server's new factors are the SVD of
    B̄·A (numpy's, by hand): A = Vᵀ with orthonormal rows, B = UΣ, their product B̄·A exactly."""
    cfg, fed = build(tiny_overrides, algorithm="fedsvd", clients=4, server_batch=3)
    seen = fake_clients(fed, monkeypatch)
    pairs = fed.aggregator.pairs
    b_and_head = fed.algorithm.trained(0)
    for rnd in range(2):
        before = fed.server.detach().clone()
        stats = fed.run_round(rnd)
        ids = sorted(seen)
        w = weights_of(cfg, fed, ids)
        for c in ids:
            start, end = seen[c]
            torch.testing.assert_close(start, before)
            assert torch.equal(end[~b_and_head], start[~b_and_head])  # A untouched by the client
        after = fed.server.detach()
        head = ~fed.algorithm.lora
        mean = sum(wk * seen[c][1].double() for wk, c in zip(w, ids))
        torch.testing.assert_close(after[head].double(), mean[head], rtol=0, atol=1e-6)
        for pair in pairs:
            a0 = factors(fed, pair, before)[0]
            b_mean = sum(wk * factors(fed, pair, seen[c][1])[1] for wk, c in zip(w, ids))
            target = (b_mean @ a0).numpy()
            a, b = factors(fed, pair, after)
            np.testing.assert_allclose((b @ a).numpy(), target, atol=1e-6)
            np.testing.assert_allclose((a @ a.T).numpy(), np.eye(pair.rank), atol=1e-6)
            sigma = np.linalg.svd(target, compute_uv=False)[: pair.rank]
            np.testing.assert_allclose(np.linalg.norm(b.numpy(), axis=0), sigma, atol=1e-6)  # B = UΣ
        assert stats["bytes_up"] == 3 * 4 * int(b_and_head.sum())
        assert stats["bytes_down"] == 3 * 4 * fed.flat.numel
        seen.clear()


def test_fedsvd_period_refactors_after_every_pth_round_only(tiny_overrides, monkeypatch):
    cfg, fed = build(tiny_overrides, algorithm="fedsvd", fedsvd_period=2, clients=4, server_batch=3)
    fake_clients(fed, monkeypatch)
    pair = fed.aggregator.pairs[0]
    a0 = factors(fed, pair, fed.server.detach())[0].clone()
    fed.run_round(0)
    assert torch.equal(factors(fed, pair, fed.server.detach())[0], a0)  # B trained, A as it was
    fed.run_round(1)
    a = factors(fed, pair, fed.server.detach())[0]
    np.testing.assert_allclose((a @ a.T).numpy(), np.eye(pair.rank), atol=1e-6)


@pytest.mark.parametrize("lam", [0.01, 0.0])
def test_lorafair_corrects_the_averaged_b_by_the_ridge_least_squares_residual(tiny_overrides, monkeypatch, lam):
    """ΔB by numpy's least squares on the augmented system [Ā, √λ·I] (an independent solve of
    min ‖(B̄ + ΔB)Ā − ΔW‖² + λ‖ΔB‖²); A and the head are the plain weighted means."""
    cfg, fed = build(tiny_overrides, algorithm="lorafair", lorafair_lambda=lam, clients=4, server_batch=3)
    seen = fake_clients(fed, monkeypatch, scale=0.2)
    stats = fed.run_round(0)
    ids = sorted(seen)
    w = weights_of(cfg, fed, ids)
    after = fed.server.detach()
    head = ~fed.algorithm.lora
    mean = sum(wk * seen[c][1].double() for wk, c in zip(w, ids))
    torch.testing.assert_close(after[head].double(), mean[head], rtol=0, atol=1e-6)
    for pair in fed.aggregator.pairs:
        a_bar, b_bar = factors(fed, pair, mean)
        target = sum(
            wk * (factors(fed, pair, seen[c][1])[1] @ factors(fed, pair, seen[c][1])[0]) for wk, c in zip(w, ids)
        )
        residual = (target - b_bar @ a_bar).numpy()
        r = pair.rank
        system = np.concatenate([a_bar.numpy().T, np.sqrt(lam) * np.eye(r)])  # rows: in + r, columns: r
        rhs = np.concatenate([residual.T, np.zeros((r, residual.shape[0]))])
        delta_b = np.linalg.lstsq(system, rhs, rcond=None)[0].T
        a, b = factors(fed, pair, after)
        np.testing.assert_allclose(a.numpy(), a_bar.numpy(), atol=1e-6)
        np.testing.assert_allclose(b.numpy(), b_bar.numpy() + delta_b, atol=1e-5)
        assert np.linalg.norm(b.numpy() @ a.numpy() - target.numpy()) < np.linalg.norm(residual)
    assert 0 < stats["lorafair_residual"] < 1
    assert stats["bytes_up"] == stats["bytes_down"] == 3 * 4 * fed.flat.numel


# ---------------------------------------------------------------- Fed-SB
def fedsb_layers(fed):
    """(module, B, A, R) of every LoRA layer of a Fed-SB run's model (R as the server holds it)."""
    from flasc.models.params import fixed_b, lora_modules

    out = []
    for _, m in lora_modules(fed.model):
        r = m.lora_B["default"].parametrizations.weight.original
        out.append((m, fixed_b(m).double(), m.lora_A["default"].weight.detach().double(), r))
    return out


def test_fedsb_starts_from_the_rank_r_svd_of_the_signed_first_step_by_hand(tiny_overrides):
    """B, R, A against an independent computation: the loss gradient of each base weight by autograd
    (the base's weight made trainable, the fresh adapter's B = 0), over the seeded validation
    examples in one batch, ΔW = −η·sign(G), numpy's SVD truncated to r: s·B·R·A equals it
    (to 1e-6 of its largest entry: the factors are float32), B and A have orthonormal columns and
    rows, R is Σ/s. Only R and the head train."""
    from flasc.runtime import seeding

    extra = {"algorithm": "fedsb", "fedsb_init_examples": 12, "client_batch": 16, "fedsb_init_lr": 0.01}
    cfg, fed = build(tiny_overrides, **extra)
    layers = fedsb_layers(fed)
    assert {n for n in fed.flat.names if "lora" in n} == {
        n for n in fed.flat.names if n.endswith("lora_B.default.parametrizations.weight.original")
    }
    assert sum(r.numel() for *_, r in layers) == len(layers) * cfg.lora_rank**2

    ref_cfg = config.load_config(overrides={**tiny_overrides, **extra, "algorithm": "fedavg"})
    ref = train_lora.build(ref_cfg, torch.device("cpu"))
    from flasc.models.params import lora_modules

    modules = [m for _, m in lora_modules(ref.model)]
    for m in modules:
        m.get_base_layer().weight.requires_grad_(True)
    idx = torch.randperm(len(ref.task.val), generator=seeding.torch_generator(cfg.seed, "fedsb_init"))[:12]
    batch = ref.task.val.batch(idx)
    ref.model.eval()
    loss, _, _ = ref.task.objective.train_terms(logits_of(ref.model, batch, torch.device("cpu"), False), batch)
    loss.backward()
    for m, (_, b, a, r) in zip(modules, layers):
        target = (-0.01 * torch.sign(m.get_base_layer().weight.grad.double())).numpy()
        u, s, vt = np.linalg.svd(target)
        best = (u[:, :4] * s[:4]) @ vt[:4]
        s_br_a = float(m.scaling["default"]) * (b @ r.detach().double() @ a).numpy()
        np.testing.assert_allclose(s_br_a, best, rtol=0, atol=1e-6 * np.abs(best).max())  # float32 factors
        np.testing.assert_allclose((b.T @ b).numpy(), np.eye(4), atol=1e-6)
        np.testing.assert_allclose((a @ a.T).numpy(), np.eye(4), atol=1e-6)
        np.testing.assert_allclose(r.detach().double().numpy(), np.diag(s[:4]) / float(m.scaling["default"]), atol=1e-6)


def test_fedsb_averages_r_exactly_and_sends_r_squared_values_a_layer(tiny_overrides, monkeypatch):
    """The server's R and head are the weighted means of the clients'; B·R̄·A is the mean of the
    clients' products B·R_k·A. Bytes: up r² a layer and the head; down the same, and B and A once
    per client (Σ r·(out + in) values), with its first download."""
    cfg, fed = build(tiny_overrides, algorithm="fedsb", clients=4, server_batch=3)
    seen = fake_clients(fed, monkeypatch)
    layers = fedsb_layers(fed)
    factor_values = sum(cfg.lora_rank * (m.out_features + m.in_features) for m, *_ in layers)
    had = set()
    for rnd in range(2):
        stats = fed.run_round(rnd)
        ids = sorted(seen)
        w = weights_of(cfg, fed, ids)
        mean = sum(wk * seen[c][1].double() for wk, c in zip(w, ids))
        torch.testing.assert_close(fed.server.detach().double(), mean, rtol=0, atol=1e-6)
        for (_, b, a, _), name in zip(layers, [n for n in fed.flat.names if n.endswith(".original")]):
            products = [b @ fed.flat.named(seen[c][1])[name].double() @ a for c in ids]
            r_bar = fed.flat.named(fed.server.detach())[name].double()
            torch.testing.assert_close(b @ r_bar @ a, sum(wk * p for wk, p in zip(w, products)), rtol=0, atol=1e-6)
        new = [c for c in ids if c not in had]
        assert stats["bytes_up"] == 3 * 4 * fed.flat.numel
        assert stats["bytes_down"] == 3 * 4 * fed.flat.numel + len(new) * 4 * factor_values
        assert rnd == 1 or stats["setup_bytes_up"] == 0  # validation examples: nothing sent
        had.update(ids)
        seen.clear()


def test_fedsb_initialised_on_the_clients_data_counts_their_gradient_uploads(tiny_overrides, monkeypatch):
    """fedsb_init_data clients with every training example drawn: every client holding one
    downloads the initial head and uploads its gradient sum, out × in values a layer, in round 1."""
    cfg, fed = build(
        tiny_overrides, algorithm="fedsb", fedsb_init_data="clients", fedsb_init_examples=100000, clients=4
    )
    fake_clients(fed, monkeypatch)
    holders = sum(1 for c in fed.clients if len(c))
    weights = sum(m.out_features * m.in_features for m, *_ in fedsb_layers(fed))
    head = sum(p.numel() for n, p in zip(fed.flat.names, fed.flat.params) if "lora_" not in n)
    stats = fed.run_round(0)
    assert stats["fedsb_init_examples"] == sum(len(c) for c in fed.clients)
    assert stats["setup_bytes_up"] == holders * 4 * weights
    assert stats["bytes_up"] == 3 * 4 * fed.flat.numel + holders * 4 * weights
    assert stats["setup_bytes_down"] == holders * 4 * head


def test_fedsb_saves_a_plain_lora_adapter_that_reproduces_the_final_evaluation(tiny_overrides):
    """peft loads the saved adapter as plain LoRA (lora_B = B·R) and scores the test split as the run did."""
    import json

    from safetensors.torch import load_file

    from data import load_task
    from flasc import models
    from flasc.tasks.evaluation import evaluate

    cfg = config.load_config(overrides={**tiny_overrides, "algorithm": "fedsb", "server_rounds": 2, "client_lr": 0.5})
    run_dir = train_lora.train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert not any("parametrizations" in k for k in saved)
    assert any(k.endswith("lora_B.weight") and v.shape == (32, 4) for k, v in saved.items())
    tok, tag = models.load_tokenizer(cfg)
    task = load_task(cfg.dataset, cfg.data_dir, lambda: (tok, tag), cfg.max_length)
    model = models.load_trained(cfg, run_dir / "adapter", task.num_labels, tok.pad_token_id)
    again = evaluate(model, task.test, task.objective, 64, torch.device("cpu"), False)
    assert again["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def test_fedsb_checkpoint_holds_the_fixed_factors_a_resume_restores(tiny_overrides):
    """A resumed run puts back the B and A it trained with, not a recomputation's (which another
    device could round differently)."""
    _, fed = build(tiny_overrides, algorithm="fedsb")
    saved = fed.state()
    module, b, a, _ = fedsb_layers(fed)[0]
    with torch.no_grad():
        module.lora_B["default"].parametrizations.weight[0].fixed.mul_(-1)
        module.lora_A["default"].weight.add_(1.0)
    fed.load_state(saved)
    _, b2, a2, _ = fedsb_layers(fed)[0]
    assert torch.equal(b2, b) and torch.equal(a2, a)


def test_fedsb_refuses_a_rank_above_a_layers_size(tiny_overrides):
    cfg = config.load_config(overrides={**tiny_overrides, "algorithm": "fedsb", "lora_rank": 40, "lora_alpha": 40})
    with pytest.raises(config.ConfigError, match=r"^lora_rank: algorithm fedsb's B and A are the top 40 .* 32 × 32"):
        train_lora.build(cfg, torch.device("cpu"))
