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
