"""LoRA-FAIR (algorithm: lorafair)."""

from __future__ import annotations

import torch

from flasc.algorithms.base import FedAvg, _named_factors


class LoRAFAIR(FedAvg):
    """LoRA-FAIR: Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
    Initialization Refinement", ICCV 2025 (arXiv 2411.14961). The server averages A, B and the head
    (weights p_k), then corrects B̄ per layer by the residual ΔB that brings (B̄ + ΔB)·Ā closest to
    the clients' mean product ΔW = Σ p_k B_k A_k, with a ridge penalty of weight λ
    (lorafair_lambda):

        ΔB = argmin ‖(B̄ + ΔB)·Ā − ΔW‖²_F + λ‖ΔB‖²_F = (ΔW − B̄Ā)·Āᵀ·(ĀĀᵀ + λI)⁻¹,

    solved in float64. The corrected factors (B̄ + ΔB, Ā) are the global model and every client's
    next start (the paper's initialisation refinement), in FedAvg's bytes. With freeze_a every
    client holds the same A, ΔW = B̄Ā and ΔB = 0 (FFA-LoRA). Metric: lorafair_residual, the
    relative residual ‖(B̄ + ΔB)Ā − ΔW‖ / ‖B̄Ā − ΔW‖ over the layers (1: no correction was
    possible; 0: exact). docs/algorithms.md ("What is sent") gives its bytes each way."""

    name = "lorafair"
    options = (*FedAvg.options, "lorafair_lambda")
    sets_server = True
    needs_linear_lora = True
    rank_tiers = False

    def aggregate(self, kept, jobs, rnd, start):
        pseudo_grad, info = super().aggregate(kept, jobs, rnd, start)
        pseudo_grad = pseudo_grad.clone()
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept).double()
        averaged = self.current - pseudo_grad  # Ā, B̄ and the averaged head
        server = self.flat.named(pseudo_grad)
        before, after = 0.0, 0.0
        for pair in self.pairs:
            a_bar, b_bar = (f.double() for f in _named_factors(self.flat, pair, averaged))
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            target = sum(wk * (b.double() @ a.double()) for wk, (a, b) in zip(w, factors))
            residual = target - b_bar @ a_bar
            gram = a_bar @ a_bar.T + self.cfg.lorafair_lambda * torch.eye(
                pair.rank, dtype=torch.float64, device=a_bar.device
            )
            delta_b = residual @ a_bar.T @ torch.linalg.pinv(gram, hermitian=True)  # λ = 0 and Ā short of rank r too
            server[pair.b].sub_(delta_b.to(pseudo_grad.dtype))
            before += float(residual.square().sum())
            after += float((residual - delta_b @ a_bar).square().sum())
        return pseudo_grad, {**info, "lorafair_residual": (after / before) ** 0.5 if before > 0 else 0.0}
