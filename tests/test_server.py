"""ServerState: the server's vector, optimizer, schedule and masks, and their checkpointed state."""

import io
import math
from types import SimpleNamespace

import torch

from flasc.federation.server import ServerState


def cfg(**kw):
    base = dict(
        server_opt="adam",
        server_lr=0.1,
        beta1=0.9,
        beta2=0.99,
        tau=1e-3,
        weight_decay=None,
        server_schedule="cosine",
        server_rounds=4,
    )
    return SimpleNamespace(**{**base, **kw})


def test_step_is_one_optimizer_step_on_the_pseudo_gradient_then_the_schedule():
    s = ServerState(torch.tensor([1.0, -2.0]), cfg(server_opt="sgd", server_lr=0.5))
    assert s.lr == 0.5
    s.step(torch.tensor([0.2, -0.4]))
    torch.testing.assert_close(s.params.detach(), torch.tensor([0.9, -1.8]))
    assert abs(s.lr - 0.5 * 0.5 * (1 + math.cos(math.pi / 4))) < 1e-12  # cosine, round 1 of 4


def test_state_dict_restores_a_server_that_continues_identically():
    a = ServerState(torch.tensor([1.0, -2.0, 0.5]), cfg())
    a.frozen_mask = torch.tensor([True, False, True])
    a.tier_masks = [torch.tensor([True, True, False])]
    for g in ([0.3, -0.1, 0.2], [0.1, 0.1, -0.5]):
        a.step(torch.tensor(g))
    buf = io.BytesIO()  # through bytes, as a checkpoint stores it (the state dict holds live tensors)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ServerState(torch.zeros(3), cfg())
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(b.frozen_mask, a.frozen_mask) and torch.equal(b.tier_masks[0], a.tier_masks[0])
    assert b.eval_mask is None and b.lr == a.lr
    for s in (a, b):
        s.step(torch.tensor([-0.2, 0.4, 0.1]))
    assert torch.equal(a.params.detach(), b.params.detach())  # moments and schedule came along
