"""Merging strategies and merge spaces against hand computations, peft's reference functions and
the properties they must have."""

from types import SimpleNamespace

import pytest
import torch
from peft.utils import merge_utils

import config
import merging
import train_lora
from merging import STRATEGIES, ClientUpdate
from model_merging_methods import (
    dare_drop,
    disjoint_mean,
    elect_sign,
    fisher_weighted_mean,
    regmean_merge,
    shrink_gram,
    weighted_sum,
)


def opts(**kw):
    base = dict(density=1.0, ties_scope="tensor", drop_rate=0.0, scaling_coefficient=1.0, seed=0, regmean_alpha=1.0)
    return SimpleNamespace(**{**base, **kw})


def merge_blocks(strategy, blocks, weights=None, **kw):
    m = next(iter(blocks.values())).shape[0]
    weights = torch.full((m,), 1.0 / m) if weights is None else weights
    ctx = SimpleNamespace(cfg=opts(**kw), rnd=0)
    updates = [ClientUpdate(k, None, 1) for k in range(m)]
    return STRATEGIES[strategy].merge(blocks, weights, ctx, updates)


# ---------------------------------------------------------------- tensor operations
def test_ties_hand_worked_example():
    tasks = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -2.0, 1.0, 0.1], [1.0, 4.0, -3.0, 0.2]])
    # trim to top 2 of 4:  [3,0,0,2]  [-2,-2,0,0]  [0,4,-3,0];  mass [1,2,-3,2] -> signs [+,+,-,+]
    merged = merge_blocks("ties", {"w": tasks}, density=0.5)["w"]
    torch.testing.assert_close(merged, torch.tensor([3.0, 4.0, -3.0, 2.0]))
    doubled = merge_blocks("ties", {"w": tasks}, density=0.5, scaling_coefficient=2.0)["w"]
    torch.testing.assert_close(doubled, 2 * merged)


def test_ties_matches_peft_with_equal_weights():
    g = torch.Generator().manual_seed(0)
    tasks = torch.randn(4, 6, 5, generator=g)
    mine = merge_blocks("ties", {"w": tasks}, density=0.3)["w"]
    ref = merge_utils.ties(list(tasks), torch.ones(4), density=0.3, majority_sign_method="total")
    torch.testing.assert_close(mine, ref)


def test_sign_election_and_disjoint_mean_match_peft():
    tasks = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    tasks[tasks.abs() < 0.3] = 0.0
    sign = elect_sign(tasks)
    assert torch.equal(tasks.sign() == sign, merge_utils.calculate_majority_sign_mask(tasks, "total"))
    torch.testing.assert_close(
        disjoint_mean(tasks, torch.full((5,), 0.2), sign), merge_utils.disjoint_merge(tasks, tasks.sign() == sign)
    )


def test_task_arithmetic_and_magnitude_prune_match_peft():
    tasks = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([0.5, 0.3, 0.2])
    ta = merge_blocks("task_arithmetic", {"w": tasks}, w, scaling_coefficient=1.5)["w"]
    torch.testing.assert_close(ta, merge_utils.task_arithmetic(list(tasks), 1.5 * w))
    mp = merge_blocks("magnitude_prune", {"w": tasks}, w, density=0.2)["w"]
    torch.testing.assert_close(mp, merge_utils.magnitude_prune(list(tasks), w, density=0.2))


def test_global_trim_scope_keeps_top_fraction_over_all_tensors():
    blocks = {"a": torch.tensor([[10.0, 9.0, 8.0]]), "b": torch.tensor([[0.1, 0.2, 7.0]])}
    per_tensor = merge_blocks("magnitude_prune", blocks, density=0.34)  # 1 of 3 in each tensor
    assert per_tensor["a"].tolist() == [10.0, 0.0, 0.0] and per_tensor["b"].tolist() == [0.0, 0.0, 7.0]
    glob = merge_blocks("magnitude_prune", blocks, density=0.34, ties_scope="global")  # 2 of 6 overall
    assert glob["a"].tolist() == [10.0, 9.0, 0.0] and glob["b"].tolist() == [0.0, 0.0, 0.0]


def test_dare_drop_is_peft_random_pruning_with_a_seeded_generator():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(42)
    ref = merge_utils.random_pruning(t, density=0.7, rescale=True)
    torch.testing.assert_close(dare_drop(t, 0.3, torch.Generator().manual_seed(42)), ref)


def test_dare_keeps_the_right_fraction_and_is_unbiased():
    t = torch.randn(20_000, generator=torch.Generator().manual_seed(4))
    kept = (dare_drop(t, 0.6, torch.Generator().manual_seed(0)) != 0).float().mean()
    assert abs(float(kept) - 0.4) < 0.01
    x = torch.randn(50, generator=torch.Generator().manual_seed(5))
    mean = torch.stack([dare_drop(x, 0.5, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(0)
    assert float((mean - x).abs().max()) < 0.1 * float(x.abs().max())


def test_fisher_with_equal_fisher_is_the_average_and_follows_confidence():
    tasks = torch.randn(3, 10, generator=torch.Generator().manual_seed(6))
    w = torch.tensor([0.2, 0.3, 0.5])
    same = torch.rand(10).expand(3, 10)
    torch.testing.assert_close(fisher_weighted_mean(tasks, same, w), weighted_sum(tasks, w))
    confident = torch.tensor([[1e6] * 10, [1.0] * 10, [1.0] * 10])
    torch.testing.assert_close(fisher_weighted_mean(tasks, confident, w), tasks[0], rtol=1e-4, atol=1e-4)


def test_regmean_with_identity_grams_is_the_average():
    tasks = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(7))
    w = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(regmean_merge(tasks, torch.eye(6).expand(3, 6, 6), w), weighted_sum(tasks, w))


def test_regmean_solves_its_least_squares_problem():
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (30, 12, 50)]
    ws = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)  # W_k: (out, in)
    grams = torch.stack([x.T @ x for x in xs])
    merged = regmean_merge(ws, grams, torch.ones(3, dtype=torch.float64))
    # min_W Σ_k ||X_k Wᵀ − X_k W_kᵀ||²: one stacked least-squares problem
    lhs = torch.cat(xs)
    rhs = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(merged, ref)


def test_shrink_gram_scales_only_off_diagonals():
    gram = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    torch.testing.assert_close(shrink_gram(gram, 0.25), torch.tensor([[4.0, 0.5], [0.5, 3.0]]))


# ---------------------------------------------------------------- on a tiny LoRA model
def federation(tiny_overrides, **extra):
    cfg = config.load_config(overrides={**tiny_overrides, **extra})
    fed = train_lora.build(cfg, torch.device("cpu"))
    with torch.no_grad():  # a non-trivial server: B != 0
        fed.server.copy_(torch.randn(fed.flat.numel, generator=torch.Generator().manual_seed(9)) * 0.5)
    return cfg, fed


def client_statistics(fed, rnd, client):
    """The strategy's statistic of the model loaded in fed.model, as a client computes it."""
    stat = fed.aggregator.statistic
    batch = fed.worker.client_examples(rnd, client, getattr(fed.cfg, stat.examples_option))
    return stat.compute(fed.resident, fed.task.objective, batch, fed.aggregator.pairs, fed.cfg.merge_space == "product")


def updates_for(fed, deltas, with_stats=True):
    start = fed.server.detach().clone()
    updates = []
    for c, delta in enumerate(deltas):
        u = ClientUpdate(c, delta, 10 + c)
        if with_stats and fed.aggregator.strategy.statistic:
            fed.flat.write(start - delta)
            u.stats, _ = client_statistics(fed, 0, c)
        updates.append(u)
    return start, updates


SAME_UPDATE_SETTINGS = [
    ("average", {}),
    ("task_arithmetic", {"scaling_coefficient": 1.0}),
    ("ties", {"density": 1.0}),
    ("dare", {"drop_rate": 0.0}),
    ("dare_ties", {"drop_rate": 0.0}),
    ("magnitude_prune", {"density": 1.0}),
    ("fisher", {}),
    ("regmean", {"regmean_alpha": 0.5}),
]


@pytest.mark.parametrize("space", ["factors", "product"])
@pytest.mark.parametrize("strategy, extra", SAME_UPDATE_SETTINGS)
@pytest.mark.parametrize("n_clients", [1, 3])
def test_identical_updates_come_back_unchanged(tiny_overrides, strategy, extra, space, n_clients):
    cfg, fed = federation(
        tiny_overrides, merging_strategy=strategy, merge_space=space, weighting="num_examples", **extra
    )
    delta = torch.randn(fed.flat.numel, generator=torch.Generator().manual_seed(10)) * 0.1
    start, updates = updates_for(fed, [delta] * n_clients)
    merged, _ = fed.aggregator.aggregate(updates, start, 0)
    if space == "factors":
        torch.testing.assert_close(merged, delta, rtol=1e-3, atol=2e-4)
        return
    # product space returns the same model in its own gauge: same products B·A, same other tensors
    lora = {n for p in fed.aggregator.pairs for n in (p.a, p.b)}
    for name, got, want in zip(fed.flat.names, fed.flat.split(merged), fed.flat.split(delta)):
        if name not in lora:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)
    for pair in fed.aggregator.pairs:
        torch.testing.assert_close(
            pair_product(fed, pair, start - merged), pair_product(fed, pair, start - delta), rtol=1e-3, atol=2e-4
        )


def test_aggregation_does_not_depend_on_client_order(tiny_overrides):
    cfg, fed = federation(tiny_overrides, merging_strategy="dare_ties", drop_rate=0.3)
    deltas = [torch.randn(fed.flat.numel, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    start, updates = updates_for(fed, deltas)
    a, _ = fed.aggregator.aggregate(updates, start, 2)
    b, _ = fed.aggregator.aggregate(updates[::-1], start, 2)
    assert torch.equal(a, b)


def pair_product(fed, pair, vec):
    named = fed.flat.named(vec)
    a = pair.frozen_a if pair.a is None else named[pair.a]
    return named[pair.b] @ a


def test_freeze_a_factor_and_product_averaging_agree(tiny_overrides):
    results = {}
    for space in ("factors", "product"):
        cfg, fed = federation(tiny_overrides, freeze_a=True, merge_space=space)
        deltas = [torch.randn(fed.flat.numel, generator=torch.Generator().manual_seed(s)) for s in range(3)]
        start, updates = updates_for(fed, deltas)
        results[space], info = fed.aggregator.aggregate(updates, start, 0)
    torch.testing.assert_close(results["product"], results["factors"], rtol=1e-4, atol=1e-5)
    assert info["svd_energy_kept"] == pytest.approx(1.0)


def test_product_averaging_is_exact_when_the_mean_product_has_rank_r(tiny_overrides):
    """Clients with different factors whose products share one rank-r row and column space: the
    mean of B_k A_k has rank <= r, product space reproduces it exactly, factor averaging does not."""
    out = {}
    for space in ("factors", "product"):
        cfg, fed = federation(tiny_overrides, merge_space=space)
        g = torch.Generator().manual_seed(11)
        start = fed.server.detach().clone()
        named_start = fed.flat.named(start)
        r = cfg.lora_rank
        shared = {}
        client_vecs = [start.clone() for _ in range(3)]
        for pair in fed.aggregator.pairs:
            d_out, d_in = named_start[pair.b].shape[0], named_start[pair.a].shape[1]
            shared[pair.name] = (
                torch.linalg.qr(torch.randn(d_out, r, generator=g))[0],
                torch.linalg.qr(torch.randn(d_in, r, generator=g))[0],
            )
            u, v = shared[pair.name]
            for vec in client_vecs:
                named = fed.flat.named(vec)
                named[pair.b].copy_(u @ torch.randn(r, r, generator=g))
                named[pair.a].copy_(torch.randn(r, r, generator=g) @ v.T)
        updates = [ClientUpdate(c, start - vec, 10) for c, vec in enumerate(client_vecs)]
        merged, info = fed.aggregator.aggregate(updates, start, 0)
        new = start - merged
        errors = []
        for pair in fed.aggregator.pairs:
            want = torch.stack([pair_product(fed, pair, vec) for vec in client_vecs]).mean(0)
            errors.append(float((pair_product(fed, pair, new) - want).abs().max()))
        out[space] = (max(errors), info)
    assert out["product"][0] < 1e-4
    assert out["product"][1]["svd_energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert out["factors"][0] > 1e-2


def test_product_space_logs_energy_below_one_for_high_rank_means(tiny_overrides):
    cfg, fed = federation(tiny_overrides, merge_space="product")
    deltas = [torch.randn(fed.flat.numel, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    start, updates = updates_for(fed, deltas)
    _, info = fed.aggregator.aggregate(updates, start, 0)
    assert 0.0 < info["svd_energy_kept_min"] <= info["svd_energy_kept"] < 1.0


def test_fisher_statistics_are_per_example_not_batch_squared(tiny_overrides):
    cfg, fed = federation(tiny_overrides, merging_strategy="fisher", fisher_examples=4)
    for m in fed.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = fed.worker.client_examples(0, 0, 4)
    stats, extra = client_statistics(fed, 0, 0)
    assert extra == fed.flat.numel
    # reference: per example, Σ_y p(y|x) (∂ log p(y|x)/∂θ)², by brute force on one tensor
    name = fed.flat.names[-1]
    param = dict(zip(fed.flat.names, fed.flat.params))[name]
    ref = torch.zeros_like(param)
    for i in range(4):
        logits = fed.model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        ).logits[0]
        logp = torch.log_softmax(logits, -1)
        for y in range(len(logp)):
            (g,) = torch.autograd.grad(logp[y], param, retain_graph=True)
            ref += logp[y].exp().detach() * g**2
    torch.testing.assert_close(stats[name], ref / 4, rtol=1e-4, atol=1e-8)


def test_regmean_grams_are_input_second_moments(tiny_overrides):
    cfg, fed = federation(tiny_overrides, merging_strategy="regmean", regmean_examples=6)
    batch = fed.worker.client_examples(0, 1, 6)
    stats, extra = client_statistics(fed, 0, 1)
    pair = fed.aggregator.pairs[0]
    seen = []
    h = pair.module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    fed.model.eval()
    with torch.no_grad():
        fed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    x = seen[0][batch["attention_mask"].bool()]
    torch.testing.assert_close(stats[pair.name + ".x"], x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    d, r = x.shape[1], pair.rank
    assert extra == len(fed.aggregator.pairs) * (d * (d + 1) // 2 + r * (r + 1) // 2)


def test_every_strategy_runs_in_a_round_and_counts_statistics_bytes(tiny_overrides):
    sizes = {}
    for name in STRATEGIES:
        cfg, fed = federation(tiny_overrides, merging_strategy=name)
        sizes[name] = fed.run_round(0)["bytes_up"]
    assert sizes["fisher"] > sizes["average"] and sizes["regmean"] > sizes["average"]
    assert sizes["ties"] == sizes["average"]


def test_registry_is_what_the_config_offers():
    with pytest.raises(config.ConfigError, match="merging_strategy"):
        config.load_config(overrides={"merging_strategy": "median"})
    for name in merging.STRATEGIES:
        config.load_config(overrides={"merging_strategy": name})


def test_refactorized_factors_stay_well_conditioned():
    """Even when the reference A is nearly singular on the target's row space."""
    g = torch.Generator().manual_seed(12)
    target = torch.randn(20, 4, generator=g) @ torch.randn(4, 30, generator=g)
    a_ref = torch.randn(4, 30, generator=g)
    a_ref[3] = a_ref[2] + 1e-7 * torch.randn(30, generator=g)  # two almost equal rows
    b, a = merging.refactorize(target, a_ref, 4)
    torch.testing.assert_close(b @ a, target, rtol=1e-4, atol=1e-4)
    assert float(torch.linalg.cond(a)) < 1.0001  # orthogonal rows, equal norms
    assert float(a.norm()) == pytest.approx(float(a_ref.norm()), rel=1e-5)
    assert float(b.norm()) < 10 * float(target.norm()) / float(a.norm()) * 4**0.5
