"""User-level differential privacy: clipping, Gaussian noise and the privacy accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"), as in
the FLASC seed code:
- each client's update, after upload sparsification, is scaled to L2 norm at most C
  (l2_clip_norm) over all its tensors together;
- the server adds N(0, (σ·C)²) to every coordinate of the dense sum of the clipped updates
  (σ = noise_multiplier) and divides by the number of clients per round. Noise is dense, so the
  sparse index pattern of any client is hidden in the released sum.
- dp_divide_by_clip: the FLASC code's scaling instead, (Σ clipped / C + N(0, σ²)) / m: the same
  release divided by C, so the same privacy; the server learning rate absorbs the factor.

Accounting: ε at δ = dp_delta (default 1/clients) for `rounds` compositions of the Poisson-subsampled
Gaussian mechanism with sampling rate q = server_batch / clients, with Google's dp-accounting (RDP).
Assumptions: the unit of privacy is a client (all of its examples); sampling is treated as Poisson
with rate q although the simulator samples exactly server_batch clients without replacement
(the usual approximation of DP-FedAvg); only the released model sequence is protected, not
statistics that strategies other than average / task_arithmetic would need (those are refused
with noise in config.py).
"""
from __future__ import annotations

import torch


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


def noisy_mean(mean: torch.Tensor, num_clients: int, noise_multiplier: float, clip_norm: float,
               generator: torch.Generator, divide_by_clip: bool = False) -> torch.Tensor:
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
