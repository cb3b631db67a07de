"""FedSVD (algorithm: fedsvd)."""

from __future__ import annotations

import torch

from flasc.algorithms.base import FedAvg, TrainsPart, _factor_and_head
from flasc.algorithms.flexlora import svd_factors
from flasc.runtime import seeding


class FedSVD(TrainsPart, FedAvg):
    """FedSVD: Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with
    LoRA", NeurIPS 2025 (arXiv 2505.12805). Every round the clients train only B (and the head)
    from the global A, and send B's update; the server averages B (the generic round: clipping, DP
    noise, a stateless server optimizer), so that B̄·A is exactly the weighted mean of the clients'
    products, then factors M = B̄·A per layer by SVD, M = U Σ Vᵀ (rank at most r), and sets A = Vᵀ
    (orthonormal rows) and B = U Σ; both go to every client. The product, and so the global model,
    is unchanged by the re-factoring; what changes is the A the next round's clients train B
    against, now the top right singular vectors of the update so far. With fedsvd_period P (its
    code's recalculate_svd_period) the re-factoring follows every P-th round only. Signs and
    components beyond M's numerical rank are fixed as flexlora.svd_factors fixes them (fresh
    orthonormal rows of A, B = 0). docs/algorithms.md ("What is sent") gives its bytes each way."""

    name = "fedsvd"
    options = (*FedAvg.options, "seed", "fedsvd_period")
    rank_tiers = False
    needs_linear_lora = True
    learns_a = "by SVD"

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.b_and_head = _factor_and_head(flat, pairs, "b", self.lora)

    def trained(self, rnd: int) -> torch.Tensor:
        return self.b_and_head

    def after_step(self, server_state, kept, jobs, rnd):
        info = super().after_step(server_state, kept, jobs, rnd)
        if (rnd + 1) % self.cfg.fedsvd_period:
            return info
        named = self.flat.named(server_state.params.detach())
        with torch.no_grad():
            for layer, pair in enumerate(self.pairs):
                a, b = named[pair.a], named[pair.b]
                generator = seeding.torch_generator(self.cfg.seed, "fedsvd_complement", rnd, layer)
                b_new, a_new, _ = svd_factors(b.double() @ a.double(), pair.rank, 1.0, generator)
                a.copy_(a_new)
                b.copy_(b_new)
        return info
