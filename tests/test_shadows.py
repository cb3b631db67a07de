"""Counterfactual (shadow) aggregation: the run's trajectory is untouched, a shadow of the run's own
strategy gains nothing, and each shadow is the strategy applied to the same updates."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import config
import train_lora


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trajectory(run_dir):
    return [
        {k: v for k, v in m.items() if not k.startswith("shadow_") and not k.endswith("seconds")}
        for m in metrics(run_dir)
    ]


@pytest.mark.parametrize("extra", [{}, {"noise_multiplier": 0.5, "l2_clip_norm": 0.5}])
def test_shadows_leave_the_run_unchanged_and_the_own_strategy_gains_nothing(tiny_overrides, tmp_path, extra):
    base = {**tiny_overrides, "dl_density": 0.5, **extra}
    plain = train_lora.train(config.load_config(overrides={**base, "name": "plain"}))
    shadowed = train_lora.train(
        config.load_config(
            overrides={
                **base,
                "name": "shadowed",
                "shadow_strategies": ["average", "ties", "fisher", "regmean@product"],
                "shadow_eval_examples": 10,
            }
        )
    )
    assert trajectory(plain) == trajectory(shadowed)
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (plain, shadowed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for m in metrics(shadowed):
        assert m["shadow_average_gain"] == 0.0 and m["shadow_average_distance"] == 0.0
        assert m["shadow_average_val_accuracy"] == m["shadow_own_val_accuracy"]
        for name in ("ties", "fisher", "regmean@product"):
            assert m[f"shadow_{name}_val_accuracy"] - m["shadow_own_val_accuracy"] == pytest.approx(
                m[f"shadow_{name}_gain"]
            )
            assert m[f"shadow_{name}_distance"] > 0  # a different aggregate of the same updates
    # scored on 10 validation examples: every accuracy is a multiple of 1/10
    assert all(
        abs(m["shadow_ties_val_accuracy"] * 10 - round(m["shadow_ties_val_accuracy"] * 10)) < 1e-9
        for m in metrics(shadowed)
    )


def test_a_shadow_is_its_strategy_applied_by_the_servers_optimizer(tiny_overrides, monkeypatch):
    """A ties shadow of an average run steps to the server that a ties run reaches from the same state
    (same updates, same Adam moments), checked against a separate ties federation."""
    common = {**tiny_overrides, "server_opt": "adam", "server_lr": 0.05}
    fed = train_lora.build(config.load_config(overrides={**common, "shadow_strategies": ["ties"]}), torch.device("cpu"))
    fed.run_round(0)  # the server optimizer has moments now
    state_before = copy.deepcopy(fed.server_state.state_dict())  # state_dict() holds live tensors
    stepped = []
    real_step = type(fed.server_state).step

    def spy(state, pseudo_grad):
        real_step(state, pseudo_grad)
        stepped.append(state.params.detach().clone())

    with monkeypatch.context() as patch:
        patch.setattr(type(fed.server_state), "step", spy)
        record = fed.run_round(1)
    own_after, shadow_after = stepped  # the run's step, then the shadow's (on a copy)
    assert torch.equal(fed.server.detach(), own_after)

    ties = train_lora.build(config.load_config(overrides={**common, "merging_strategy": "ties"}), torch.device("cpu"))
    ties.server_state.load_state_dict(state_before)
    ties.run_round(1)
    torch.testing.assert_close(shadow_after, ties.server.detach(), rtol=0, atol=0)
    assert record["shadow_ties_distance"] > 0 and not torch.equal(own_after, shadow_after)


def test_shadow_strategies_refuse_what_the_run_could_not_use(tiny_overrides):
    with pytest.raises(config.ConfigError, match="shadow_strategies: 'nope' is not valid"):
        config.load_config(overrides={**tiny_overrides, "shadow_strategies": ["ties", "nope"]})
    with pytest.raises(config.ConfigError, match="shadow_strategies: regmean: merging_strategy: regmean merges LoRA"):
        config.load_config(overrides={**tiny_overrides, "lora_rank": 0, "shadow_strategies": ["regmean"]})
    assert config.load_config(overrides={**tiny_overrides, "shadow_strategies": "ties"}).shadow_strategies == ["ties"]


def test_shadow_freq_shadows_only_the_rounds_due(tiny_overrides):
    cfg = config.load_config(overrides={**tiny_overrides, "shadow_strategies": ["ties"], "shadow_freq": 2})
    fed = train_lora.build(cfg, torch.device("cpu"))
    assert "shadow_ties_gain" not in fed.run_round(0)  # round 1: not due
    assert "shadow_ties_gain" in fed.run_round(1)  # round 2: due
    with pytest.raises(config.ConfigError, match="shadow_freq: "):
        config.load_config(overrides={**tiny_overrides, "shadow_freq": 0})
