"""FedEx-LoRA (algorithm: fedex)."""

from __future__ import annotations

import math

from flasc.algorithms.base import FedAvg, _components, _named_factors


class FedEx(FedAvg):
    """FedEx-LoRA: Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
    Fine-Tuning of Foundation Models", ACL 2025. A, B and the head are averaged as in FedAvg; the
    residual s·(Σ p_k B_k A_k − B̄ Ā) of each layer is folded into its frozen base weight W0 (as
    out × in, without the original code's transpose), so that W0 + s·B̄Ā is exactly the mean of
    the clients' effective weights. docs/algorithms.md ("What is sent") gives its bytes each way."""

    name = "fedex"
    rank_tiers = False
    sets_server = True
    needs_linear_lora = True
    folds_base = True

    def after_step(self, server_state, kept, jobs, rnd):
        kept = sorted(kept, key=lambda r: r.client_id)
        w = self.weights(kept)
        server = server_state.params.detach()
        increments, values = {}, {}
        for pair in self.pairs:
            factors = [self.client_factors(pair, jobs[r.client_id], r) for r in kept]
            mean_product = sum(wk * (b @ a) for wk, (a, b) in zip(w, factors))
            a_new, b_new = _named_factors(self.flat, pair, server)
            increments[pair.name] = pair.scaling * (mean_product - b_new @ a_new)
            out_f, in_f = increments[pair.name].shape
            values[pair.name] = sum(_components(pair, jobs[r.client_id].plan.download, self.flat) for r in kept) * (
                in_f + out_f
            )
        self.base.add(increments, values)
        return {"base_residual_norm": math.sqrt(sum(float(x.square().sum()) for x in increments.values()))}
