"""uploads.py: restrict -> sparsify -> clip, and the bytes of what is sent, by hand."""

import math

import torch

from flasc.federation import uploads
from flasc.federation.communication import message_bytes


def test_restrict_sparsify_clip_in_order_with_their_bytes():
    delta = torch.tensor([3.0, -4.0, 0.5, 12.0, -0.1, 0.0, 2.0, -1.0])
    tier = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)  # entry 3 is not this tier's
    up = uploads.prepare(delta, [uploads.restrict(tier), uploads.sparsify(1.0), uploads.clip(0.0)])
    assert torch.equal(up.delta, delta * tier) and up.sent == 7 and up.positions_known
    assert up.bytes == 4 * 7 and up.norm == torch.linalg.norm(delta * tier).item() and not up.clipped
    # top-k at density 1/4: k = 2 of 8 by magnitude (12 and -4), then clipped to norm 5
    up = uploads.prepare(delta, [uploads.restrict(None), uploads.sparsify(0.25), uploads.clip(5.0)])
    norm = math.hypot(12.0, 4.0)
    torch.testing.assert_close(up.delta, torch.tensor([0, -4.0, 0, 12.0, 0, 0, 0, 0]) * (5.0 / norm))
    assert (up.sent, up.positions_known, up.clipped) == (2, False, True)
    assert up.norm == torch.tensor(norm).item()
    assert up.bytes == message_bytes(8, 2) == 4 * 2 + 1  # values + an 8-bit bitmap
    dense = uploads.prepare(delta, [uploads.sparsify(1.0)])
    assert dense.bytes == 4 * 8 and dense.sent == 8
