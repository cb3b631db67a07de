"""FlexLoRA (algorithm: flexlora)."""

from __future__ import annotations

import torch

from flasc.algorithms.base import FedAvg
from flasc.runtime import seeding


class FlexLoRA(FedAvg):
    """FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
    Tasks and Client Resources", NeurIPS 2024. The server forms ΔW_g = Σ p_k s B_k A_k per layer
    and factors it by SVD, U Σ Vᵀ: B = U Σ / s (the singular values in B, the paper's choice), A =
    Vᵀ, components in decreasing σ; flexlora_split: balanced puts √σ on each side instead (B =
    U √Σ / √s, A = √Σ Vᵀ / √s), which keeps the factors' scales equal and so the local steps on
    them alike. A client of rank r_k (a rank tier) downloads the first r_k components, so its
    adapter is exactly the best rank-r_k approximation of ΔW_g; the base is never modified; the
    head is averaged. All tiers use the adapter's scaling s (lora_alpha / lora_rank; rsLoRA:
    lora_alpha / √lora_rank), so s·B·A means the same at every rank. docs/algorithms.md ("What is
    sent") gives its bytes each way."""

    name = "flexlora"
    options = (*FedAvg.options, "seed", "flexlora_split")
    sets_server = True
    needs_linear_lora = True
    learns_a = "by SVD"

    def aggregate(self, kept, jobs, rnd, start):
        pseudo_grad, info = super().aggregate(kept, jobs, rnd, start)
        pseudo_grad = pseudo_grad.clone()
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept)
        server = self.flat.named(pseudo_grad)
        current = self.flat.named(self.current)
        kept_energy, total_energy = 0.0, 0.0
        for layer, pair in enumerate(self.pairs):
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            target = pair.scaling * sum(wk * (b @ a) for wk, (a, b) in zip(w, factors))
            b_new, a_new, sigma = svd_factors(
                target,
                pair.rank,
                pair.scaling,
                seeding.torch_generator(self.cfg.seed, "flexlora_complement", rnd, layer),
                self.cfg.flexlora_split,
            )
            server[pair.a].copy_(current[pair.a] - a_new)
            server[pair.b].copy_(current[pair.b] - b_new)
            kept_energy += float(sigma[: pair.rank].square().sum())
            total_energy += float(sigma.square().sum())
        info = {**info, "svd_energy_kept": kept_energy / total_energy if total_energy > 0 else 1.0}
        return pseudo_grad, info


def fixed_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular pairs (columns of u, rows of vh) with the sign that makes the largest-magnitude
    entry of each row of vh positive: LAPACK and cuSOLVER choose differently, this is the same on
    every device (the product u·diag(σ)·vh is unchanged)."""
    signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def svd_factors(
    target: torch.Tensor,
    rank: int,
    scaling: float,
    generator: torch.Generator | None = None,
    split: str = "b",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, σ): target ≈ s·B·A truncated to `rank` by SVD. split "b": σ in B, A with orthonormal
    rows (B = UΣ/s, A = Vᵀ); "balanced": √σ on each side (B = U√Σ/√s, A = √Σ Vᵀ/√s), so that B
    and A have equal column and row norms.

    What the SVD leaves open is fixed, so that every device gives the same factors: a singular
    pair's sign (LAPACK and cuSOLVER choose differently) makes the largest-magnitude entry of its
    row of A positive (flipping both factors of a component flips every later update of them too:
    training is unchanged); and components beyond the target's numerical rank (σ_j at most
    eps·max(m, n)·σ_1, the float rounding of the SVD of an m × n matrix, as numpy's matrix_rank
    counts; an aggregate of low-rank clients), whose singular vectors are arbitrary, get B = 0 and
    unit rows of A orthogonal to each other and to the kept rows, drawn from `generator` on the CPU in
    float64, as a fresh LoRA component starts (B = 0, A random). Every component above the
    rounding is kept, so s·B·A is the best rank-`rank` approximation of the target."""
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    r = min(rank, sigma.numel())
    if sigma.numel():
        rounding = torch.finfo(sigma.dtype).eps * max(target.shape) * sigma[0]
        r = min(r, int((sigma > rounding).sum()))
    u, vh = fixed_signs(u[:, :r], vh[:r])
    b = torch.zeros(target.shape[0], rank, dtype=target.dtype, device=target.device)
    a = torch.zeros(rank, target.shape[1], dtype=target.dtype, device=target.device)
    if split == "balanced":
        root = (sigma[:r] / scaling).sqrt()
        b[:, :r] = u * root
        a[:r] = vh * root[:, None]
    else:
        b[:, :r] = u * sigma[:r] / scaling
        a[:r] = vh
    free = min(rank, target.shape[1]) - r
    if free > 0:
        a[r : r + free] = orthonormal_complement(vh, free, generator).to(a)
    return b, a, sigma


def orthonormal_complement(rows: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` random unit rows orthogonal to each other and to `rows` (orthonormal), in float64 on the CPU."""
    taken = rows.detach().double().cpu()
    draw = torch.randn(count, taken.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(2):  # project out twice: orthogonal to working precision
        draw = draw - (draw @ taken.T) @ taken
    q, r = torch.linalg.qr(draw.T)
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).T
