"""RoLoRA (algorithm: rolora)."""

from __future__ import annotations

from flasc.algorithms.base import FedAvg, TrainsPart, _factor_and_head


class RoLoRA(TrainsPart, FedAvg):
    """RoLoRA: Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of
    LoRA", NeurIPS 2025 (arXiv 2502.01755). Rounds alternate between the factors: in rounds 1, 3,
    5, … every client trains B with A frozen, in rounds 2, 4, … A with B frozen (the head, if any,
    trains every round), and sends the update of what it trained. The frozen factor is the same on
    every client, so the weighted mean of the trained one times it is exactly the weighted mean of
    the clients' products (Σ p_k B_k A = B̄ A, and likewise for A): the aggregation has no
    cross-terms. B trains first because it starts at zero, where A's gradient Bᵀ ∂L/∂(BA) is zero.
    The server averages what was sent (the generic round: clipping, DP noise and a stateless
    server optimizer); the frozen factor stays exactly where every client holds it (base.py's
    TrainsPart). docs/algorithms.md ("What is sent") gives its bytes each way."""

    name = "rolora"
    learns_a = "in every other round"

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        super().__init__(cfg, flat, pairs, aggregator, server_state)
        self.trains = {factor: _factor_and_head(flat, pairs, factor, self.lora) for factor in ("b", "a")}

    def trained(self, rnd: int):
        """B and the head in rounds 1, 3, … (rnd 0, 2, …), A and the head in rounds 2, 4, …"""
        return self.trains["b" if rnd % 2 == 0 else "a"]
