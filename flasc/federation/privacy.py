"""User-level differential privacy: clipping, the Gaussian mechanism on the aggregate, the
privacy accountant, and the combinations they refuse.

docs/privacy-and-heterogeneity.md gives the mechanism (DP-FedAvg, McMahan et al. 2018, as in the
FLASC seed code), the two scalings (dp_divide_by_clip) and the accounting assumptions. Here: the
noise is drawn once a round from a generator seeded by (seed, round) on the CPU (release), so the
run and every shadow strategy get the same draw on every device.
"""

from __future__ import annotations

import torch

from flasc.options import ConfigError
from flasc.runtime import seeding

options = (
    "l2_clip_norm",
    "noise_multiplier",
    "dp_delta",
    "dp_divide_by_clip",
    "clients",
    "server_batch",
    "server_rounds",
)

# algorithms whose pseudo-gradient is the (weighted) mean of the clients' clipped updates, so that
# dividing it by the clipping norm (dp_divide_by_clip) scales the server step and nothing else
_MEAN_OF_UPDATES = ("fedavg", "fedsa", "rolora", "fedsb", "fedsvd")


def check(cfg) -> None:
    """Clipping, noise and the FLASC code's scaling must describe one Gaussian mechanism."""
    if cfg.dp_divide_by_clip and cfg.l2_clip_norm <= 0:
        raise ConfigError(
            "dp_divide_by_clip: divides the sum of clipped updates by the clipping norm; "
            "expected l2_clip_norm > 0 as well"
        )
    if cfg.dp_divide_by_clip and cfg.algorithm not in _MEAN_OF_UPDATES:
        raise ConfigError(
            f"dp_divide_by_clip: divides the mean of the clipped updates by the clipping norm, and "
            f"algorithm {cfg.algorithm} builds its model from the updates otherwise (factors, "
            f"products, control variates, base folds), which would not be scaled alike; expected "
            f"dp_divide_by_clip: false (or algorithm {' or '.join(_MEAN_OF_UPDATES)})"
        )
    if cfg.noise_multiplier > 0:
        if cfg.l2_clip_norm <= 0:
            raise ConfigError(
                "noise_multiplier: noise is scaled by the clipping norm; expected l2_clip_norm > 0 as well"
            )
        if (cfg.merging_strategy, cfg.weighting, cfg.merge_space) != ("average", "uniform", "factors"):
            raise ConfigError(
                "noise_multiplier: the Gaussian mechanism is accounted for the uniform mean of "
                "clipped updates; expected merging_strategy: average, weighting: uniform, "
                "merge_space: factors"
            )
        if cfg.algorithm not in _MEAN_OF_UPDATES:
            raise ConfigError(
                f"noise_multiplier: the Gaussian mechanism covers a uniform mean of clipped updates; "
                f"algorithm {cfg.algorithm} uses the updates otherwise (products, control variates); "
                f"expected 0 (or algorithm {' or '.join(_MEAN_OF_UPDATES)})"
            )


def clip_update(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale the update to L2 norm at most clip_norm; returns it and its norm before clipping.
    clip_norm 0 disables clipping."""
    norm = float(update.norm())
    if clip_norm <= 0 or norm <= clip_norm:
        return update, norm
    return update * (clip_norm / norm), norm


def gaussian_noise(numel: int, std: float, generator: torch.Generator, device) -> torch.Tensor:
    """Dense N(0, std²) noise, drawn on the CPU from a seeded generator (same on every device)."""
    return (torch.randn(numel, generator=generator, dtype=torch.float32) * std).to(device)


def release(pseudo_grad: torch.Tensor, num_clients: int, cfg, rnd: int) -> torch.Tensor:
    """The run's Gaussian mechanism on round `rnd`'s aggregate (unchanged without noise or
    dp_divide_by_clip): the one noise draw of the round, seeded by (seed, round), the same for the
    run and for every shadow aggregate of that round."""
    if cfg.noise_multiplier <= 0 and not cfg.dp_divide_by_clip:
        return pseudo_grad
    return noisy_mean(
        pseudo_grad,
        num_clients,
        cfg.noise_multiplier,
        cfg.l2_clip_norm,
        seeding.torch_generator(cfg.seed, "noise", rnd),
        cfg.dp_divide_by_clip,
    )


def noisy_mean(
    mean: torch.Tensor,
    num_clients: int,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    divide_by_clip: bool = False,
) -> torch.Tensor:
    """(Σ_k clipped_k + N(0, (σC)²)) / m, given the mean Σ_k clipped_k / m; with divide_by_clip
    (Σ_k clipped_k / C + N(0, σ²)) / m, as the FLASC code computes it."""
    if noise_multiplier > 0:
        noise = gaussian_noise(mean.numel(), noise_multiplier * clip_norm, generator, mean.device)
        mean = mean + noise.view_as(mean) / num_clients
    return mean / clip_norm if divide_by_clip else mean


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after `rounds` Poisson-subsampled Gaussian rounds (dp-accounting's RDP accountant)."""
    from absl import logging as absl_logging
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    # RDP orders below 2 may not converge at large q; they are skipped, which is expected, not news
    absl_logging.set_verbosity(absl_logging.ERROR)
    if rounds == 0:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def resolved_delta(cfg) -> float:
    return cfg.dp_delta if cfg.dp_delta > 0 else 1.0 / cfg.clients
