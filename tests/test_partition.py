import numpy as np
import pytest

from data import partition


def labels_of(n_per_class=(300, 200, 100, 250, 150)):
    return np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])


def assert_exact_cover(clients, n):
    allidx = np.concatenate(clients)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 100.0])
def test_dirichlet_assigns_every_example_exactly_once(alpha):
    y = labels_of()
    clients = partition.dirichlet(y, 30, alpha, np.random.default_rng(3), min_size=0)
    assert len(clients) == 30
    assert_exact_cover(clients, len(y))


def mean_label_skew(alpha, seeds=range(5)):
    """Mean total-variation distance between client label histograms and the global one."""
    y = labels_of()
    glob = np.bincount(y) / len(y)
    tvs = []
    for s in seeds:
        clients = partition.dirichlet(y, 20, alpha, np.random.default_rng(s), min_size=0)
        hist = partition.label_histogram(clients, y, 5)
        sizes = hist.sum(1)
        rows = hist[sizes > 0] / sizes[sizes > 0, None]
        tvs.append(0.5 * np.abs(rows - glob).sum(1).mean())
    return float(np.mean(tvs))


def test_label_skew_grows_as_alpha_falls():
    skews = [mean_label_skew(a) for a in (1000.0, 1.0, 0.1, 0.01)]
    assert all(a < b for a, b in zip(skews, skews[1:])), skews
    assert skews[0] < 0.1 and skews[-1] > 0.5


def test_seeded_reproducibility():
    y = labels_of()
    a = partition.dirichlet(y, 10, 0.3, np.random.default_rng(7))
    b = partition.dirichlet(y, 10, 0.3, np.random.default_rng(7))
    c = partition.dirichlet(y, 10, 0.3, np.random.default_rng(8))
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_tiny_clients_are_topped_up_from_the_largest():
    y = labels_of((30, 20, 15, 10, 5))
    raw = partition.dirichlet(y, 20, 0.05, np.random.default_rng(0), min_size=0)
    assert min(len(c) for c in raw) < 2  # this seed really produces empty or tiny clients
    fixed = partition.dirichlet(y, 20, 0.05, np.random.default_rng(0), min_size=2)
    assert min(len(c) for c in fixed) >= 2
    assert_exact_cover(fixed, len(y))


def test_min_size_that_cannot_be_met_is_refused():
    with pytest.raises(ValueError, match="min_client_size"):
        partition.iid(10, 5, np.random.default_rng(0), min_size=3)


def test_iid_shards_are_balanced_and_cover():
    clients = partition.iid(1003, 10, np.random.default_rng(0))
    assert {len(c) for c in clients} <= {100, 101}
    assert_exact_cover(clients, 1003)


def test_iid_mix_zero_keeps_natural_clients():
    y = labels_of()
    natural = partition.dirichlet(y, 10, 0.1, np.random.default_rng(0))
    mixed = partition.iid_mix(natural, 0.0, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(natural, mixed))


def test_iid_mix_one_is_iid_and_loses_nothing():
    y = labels_of()
    natural = partition.dirichlet(y, 10, 0.05, np.random.default_rng(0))
    mixed = partition.iid_mix(natural, 1.0, np.random.default_rng(1))
    assert_exact_cover(mixed, len(y))
    assert {len(c) for c in mixed} <= {len(y) // 10, len(y) // 10 + 1}
    glob = np.bincount(y) / len(y)
    tv = lambda cs: np.mean([0.5 * np.abs(np.bincount(y[c], minlength=5) / len(c) - glob).sum() for c in cs])  # noqa: E731
    assert tv(mixed) < 0.1 < tv(natural)


def test_iid_mix_half_keeps_half_of_each_client():
    y = labels_of()
    natural = partition.dirichlet(y, 10, 0.1, np.random.default_rng(0))
    mixed = partition.iid_mix(natural, 0.5, np.random.default_rng(1))
    assert_exact_cover(mixed, len(y))
    for a, b in zip(natural, mixed):
        assert len(np.intersect1d(a, b)) >= round(0.5 * len(a))


def test_partition_report():
    y = np.array([0, 0, 1, 1, 1, 2])
    rep = partition.report([np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([], dtype=np.int64)], y, ["a", "b", "c"])
    assert rep["clients"][0] == {"client": 0, "examples": 3, "labels": [2, 1, 0]}
    assert rep["summary"]["empty_clients"] == 1 and rep["summary"]["examples"] == 6


def test_report_sums_multi_hot_labels_and_handles_unlabelled_tasks():
    clients = [np.array([0, 1]), np.array([2])]
    multi_hot = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]])
    rep = partition.report(clients, multi_hot, ["a", "b", "c"])
    assert [c["labels"] for c in rep["clients"]] == [[2, 1, 1], [0, 0, 1]]
    assert [c["examples"] for c in rep["clients"]] == [2, 1]
    # label occurrence shares: whole (2, 1, 2)/5, client 0 (2, 1, 1)/4, client 1 (0, 0, 1)
    tv0 = 0.5 * (abs(0.5 - 0.4) + abs(0.25 - 0.2) + abs(0.25 - 0.4))
    tv1 = 0.5 * (0.4 + 0.2 + 0.6)
    assert rep["summary"]["mean_label_tv_distance"] == pytest.approx((tv0 + tv1) / 2)
    plain = partition.report(clients, None, [])
    assert plain["summary"]["examples"] == 3 and "mean_label_tv_distance" not in plain["summary"]
    assert plain["clients"] == [{"client": 0, "examples": 2}, {"client": 1, "examples": 1}]
