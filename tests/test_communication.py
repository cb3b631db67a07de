import math

import pytest
import torch

from flasc.federation.communication import density_at, message_bytes, topk_mask


@pytest.mark.parametrize("n, density", [(1000, 0.25), (1000, 0.1), (37, 0.5), (12345, 0.013), (10, 1.0)])
def test_topk_keeps_exactly_int_n_density_largest(n, density):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    mask = topk_mask(x, density)
    k = int(n * density)
    assert int(mask.sum()) == k
    if 0 < k < n:  # every kept magnitude >= every dropped one
        assert x.abs()[mask].min() >= x.abs()[~mask].max()


def test_topk_with_ties_still_keeps_exactly_k():
    x = torch.tensor([0.0] * 50 + [1.0] * 30 + [-1.0] * 20)
    mask = topk_mask(x, 0.4)
    assert int(mask.sum()) == 40 and bool((x.abs()[mask] == 1).all())
    zeros = topk_mask(torch.zeros(100), 0.3)
    assert int(zeros.sum()) == 30


def test_topk_is_global_over_shape():
    x = torch.tensor([[10.0, 0.1], [0.2, 9.0], [0.3, 0.4]])
    mask = topk_mask(x, 0.34)  # k = int(6 * 0.34) = 2
    assert mask.shape == x.shape
    assert mask.tolist() == [[True, False], [False, True], [False, False]]


def test_density_schedule():
    assert density_at(0.5, 0.5, 3, 0) == 0.5
    assert density_at(0.5, 0.5, 3, 2) == 0.5
    assert density_at(0.5, 0.5, 3, 3) == 0.25
    assert density_at(0.5, 0.5, 3, 7) == 0.125
    assert density_at(1.0, 1.0, 1, 99) == 1.0


def test_message_bytes_formula():
    n = 10_000
    assert message_bytes(n, n) == 4 * n  # dense fp32
    k = 100  # very sparse: indices are cheaper
    assert message_bytes(n, k) == 4 * k + 4 * k
    k = 2500  # 25%: the bitmap is cheaper
    assert message_bytes(n, k) == 4 * k + math.ceil(n / 8)
    assert message_bytes(n, 9999) == 4 * n  # never more than sending it dense
    assert message_bytes(9, 4) == 16 + 2  # bitmap rounds up to whole bytes
