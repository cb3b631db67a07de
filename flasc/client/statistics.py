"""Client-side statistics that Fisher merging and RegMean need, computed on the client's own data
with the client's uploaded model loaded in the resident model. A strategy declares the statistic it
needs (merging.py: `Strategy.statistic`); the client work computes it (worker.py) and sends it
with the update. docs/aggregation.md defines both statistics, in each merge space.

How they are computed: the diagonal Fisher is the exact expectation over labels (the objective
lists the (log p, p) terms: every class, or both values of every label) of squared per-example
gradients, never the square of a batch-summed gradient; in product space the gradient of a LoRA
layer's effective weight comes from forward hooks on the layer, Σ_tokens (∂L/∂out_t) x_tᵀ over its
non-padding tokens. The Gram matrices are sums over tokens in fp32, whatever the autocast.
"""

from __future__ import annotations

import torch

from flasc.tasks.evaluation import autocast, logits_of, model_inputs


def _examples(batch: dict) -> int:
    return len(next(iter(batch.values())))


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, tokens, features) -> (kept tokens, features): padding dropped when there is a mask."""
    return x[mask] if mask is not None else x.reshape(-1, x.shape[-1])


def _record_layer_io(pairs):
    """Forward hooks keeping each LoRA layer's input (detached) and output (in the graph)."""
    seen, handles = {}, []
    for pair in pairs:

        def keep(module, args, out, name=pair.name):
            seen[name] = (args[0].detach(), out)

        handles.append(pair.module.register_forward_hook(keep))
    return seen, handles


def fisher_diagonal(resident, objective, batch: dict, pairs, product_space: bool) -> dict[str, torch.Tensor]:
    """Per-example Fisher over `batch`, averaged; keys are flat names, and in product space the
    LoRA pairs' names (their W) replace their factors."""
    model, flat, device = resident.model, resident.flat, resident.device
    model.eval()  # no dropout: the Fisher of the model as it will be merged
    layers = list(pairs) if product_space else []
    factor_names = {n for p in layers for n in (p.a, p.b) if n}
    plain = [(n, p) for n, p in zip(flat.names, flat.params) if n not in factor_names]
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in plain}
    seen, handles = _record_layer_io(layers)
    n = _examples(batch)
    try:
        for i in range(n):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            logits = logits_of(model, one, device, resident.bf16)
            mask = one["attention_mask"].to(device).bool() if "attention_mask" in one else None
            targets = [p for _, p in plain] + [seen[p.name][1] for p in layers]
            for logp, prob in objective.fisher_terms(logits[0]):
                grads = torch.autograd.grad(logp, targets, retain_graph=True, allow_unused=True)
                for (name, _), g in zip(plain, grads):
                    if g is not None:
                        totals[name] += prob * g.float() ** 2
                for pair, g_out in zip(layers, grads[len(plain) :]):
                    if g_out is None:
                        continue
                    x = _tokens(seen[pair.name][0], mask).float()
                    gw = _tokens(g_out, mask).float().T @ x  # ∂ log p / ∂W, (out, in)
                    totals[pair.name] = totals.get(pair.name, 0) + prob * gw**2
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(n, 1) for k, v in totals.items()}


@torch.no_grad()
def input_grams(resident, batch: dict, pairs, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{pair.name + '.x': Gram of the layer input, pair.name + '.ax': Gram of A x}."""
    model, device = resident.model, resident.device
    model.eval()
    sums, counts, handles = {}, {}, []
    token_mask = {}

    def add(key, x):
        x = _tokens(x.float(), token_mask["m"])
        # the hooks run inside the bf16 autocast of the forward pass: keep the Gram sums in fp32
        with torch.autocast(device_type=x.device.type, enabled=False):
            sums[key] = sums.get(key, 0) + x.T @ x
        counts[key] = counts.get(key, 0) + x.shape[0]

    def hook(module, args, out, key):
        add(key + ".x", args[0])
        add(key + ".ax", out)  # returns None: a forward hook that returns a value replaces the output

    for pair in pairs:
        handles.append(
            pair.module.lora_A["default"].register_forward_hook(
                lambda m, args, out, key=pair.name: hook(m, args, out, key)
            )
        )
    try:
        for start in range(0, _examples(batch), batch_size):
            part = model_inputs({k: v[start : start + batch_size] for k, v in batch.items()}, device)
            token_mask["m"] = part["attention_mask"].bool() if "attention_mask" in part else None
            with autocast(device, resident.bf16):
                model(**part)
    finally:
        for h in handles:
            h.remove()
    return {k: sums[k] / max(counts[k], 1) for k in sums}


# ---------------------------------------------------------------- what a strategy declares
class DiagonalFisher:
    """Fisher merging's statistic: the diagonal Fisher of every merged quantity."""

    examples_option = "fisher_examples"  # the config key: how many of the client's examples

    def compute(self, resident, objective, batch, pairs, product_space: bool) -> tuple[dict, int]:
        """The statistics and how many fp32 values they add to the upload."""
        stats = fisher_diagonal(resident, objective, batch, pairs, product_space)
        return stats, sum(v.numel() for v in stats.values())


class InputGram:
    """RegMean's statistic: the input Gram matrix of every LoRA factor (x for A, A x for B); in
    product space only the layer input's (the merged δW = B A acts on x)."""

    examples_option = "regmean_examples"

    def compute(self, resident, objective, batch, pairs, product_space: bool) -> tuple[dict, int]:
        """The Gram matrices and how many fp32 values they add to the upload (symmetric: the upper
        triangle is sent)."""
        stats = input_grams(resident, batch, pairs)
        if product_space:
            stats = {k: v for k, v in stats.items() if k.endswith(".x")}
        return stats, sum(v.shape[0] * (v.shape[0] + 1) // 2 for v in stats.values())
