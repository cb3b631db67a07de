"""Clipping, the Gaussian mechanism and the accountant."""

import json

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from test_end_to_end import read_metrics, run

import config
import train_lora
from flasc.federation import privacy


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        u = torch.randn(500, generator=g) * scale
        clipped, norm = privacy.clip_update(u, 1.5)
        assert norm == pytest.approx(float(u.norm()))
        assert float(clipped.norm()) <= 1.5 + 1e-5
        if norm <= 1.5:
            assert torch.equal(clipped, u)
        else:
            torch.testing.assert_close(clipped / clipped.norm(), u / u.norm())  # direction kept
    same, _ = privacy.clip_update(torch.ones(4) * 100, 0.0)
    assert torch.equal(same, torch.ones(4) * 100)  # 0: no clipping


def test_noise_has_the_stated_standard_deviation():
    m, sigma, clip = 4, 0.8, 2.0
    mean = torch.zeros(200_000)
    noisy = privacy.noisy_mean(mean, m, sigma, clip, torch.Generator().manual_seed(1))
    std = float(noisy.std())
    # noise on the sum has std σC; on the mean σC/m. 200k samples: relative error of std ≈ 0.2%
    assert std == pytest.approx(sigma * clip / m, rel=0.01)
    assert abs(float(noisy.mean())) < 5 * sigma * clip / m / 200_000**0.5


def accountant_epsilon(sigma, q, rounds, delta):
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), rounds)
    return acc.get_epsilon(delta)


def test_epsilon_is_dp_accounting_and_moves_the_right_way():
    assert privacy.epsilon(1.0, 0.1, 50, 1e-3) == accountant_epsilon(1.0, 0.1, 50, 1e-3)
    by_rounds = [privacy.epsilon(1.0, 0.1, t, 1e-3) for t in (1, 10, 100)]
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    by_noise = [privacy.epsilon(s, 0.1, 50, 1e-3) for s in (0.5, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]


def test_run_reports_epsilon_equal_to_the_accountant(tiny_overrides, tmp_path):
    run(tiny_overrides, l2_clip_norm=0.5, noise_multiplier=1.1)
    run_dir = tmp_path / "runs" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    q = tiny_overrides["server_batch"] / tiny_overrides["clients"]
    assert summary["dp_delta"] == pytest.approx(1 / tiny_overrides["clients"])
    assert summary["epsilon"] == accountant_epsilon(1.1, q, 3, 1 / tiny_overrides["clients"])
    eps = [m["epsilon"] for m in read_metrics(run_dir)]
    assert eps == sorted(eps) and eps[-1] == summary["epsilon"]


def test_zero_noise_with_no_clipping_effect_is_identical_to_non_dp(tiny_overrides, tmp_path):
    run(tiny_overrides, name="plain")
    run(tiny_overrides, name="dp", l2_clip_norm=1e6, noise_multiplier=0.0)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in ms]  # noqa: E731
    assert strip(read_metrics(tmp_path / "runs" / "plain")) == strip(read_metrics(tmp_path / "runs" / "dp"))


def test_clipped_updates_reach_the_server_with_norm_at_most_c(tiny_overrides, monkeypatch):
    cfg = config.load_config(overrides={**tiny_overrides, "l2_clip_norm": 1e-3, "ul_density": 0.5})
    fed = train_lora.build(cfg, torch.device("cpu"))
    seen = []
    real = fed.aggregator.aggregate
    monkeypatch.setattr(fed.aggregator, "aggregate", lambda ups, s, r: (seen.extend(ups), real(ups, s, r))[1])
    stats = fed.run_round(0)
    assert stats["clipped_fraction"] == 1.0
    assert all(float(u.delta.norm()) <= 1e-3 * (1 + 1e-5) for u in seen)
    assert all(int((u.delta != 0).sum()) <= fed.flat.numel // 2 for u in seen)  # sparsified, then clipped


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"noise_multiplier": 1.0}, ["noise_multiplier", "l2_clip_norm"]),
        ({"noise_multiplier": 1.0, "l2_clip_norm": 1.0, "merging_strategy": "ties"}, ["merging_strategy: average"]),
        ({"noise_multiplier": 1.0, "l2_clip_norm": 1.0, "weighting": "num_examples"}, ["weighting: uniform"]),
        ({"dp_delta": 1.0}, ["dp_delta"]),
    ],
)
def test_dp_rejections(overrides, words):
    with pytest.raises(config.ConfigError) as e:
        config.load_config(overrides=overrides)
    for w in words:
        assert w in str(e.value)
