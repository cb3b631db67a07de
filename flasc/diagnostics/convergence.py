"""Speed of convergence (summary.json): rounds, megabytes and seconds to `target_accuracy`, and the
area under the validation curve; docs/diagnostics.md ("Speed of convergence") defines them."""

from __future__ import annotations


def convergence(evals: list[dict], primary: str, target: float | None) -> dict:
    """val_auc, and with a target the rounds / megabytes / seconds to reach it (None: never)."""
    xs, ys = [e["round"] for e in evals], [e[f"val_{primary}"] for e in evals]
    if len(xs) == 1 or xs[-1] == xs[0]:
        auc = ys[-1]
    else:
        area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
        auc = area / (xs[-1] - xs[0])
    out = {f"val_{primary}_auc": auc}
    if target is None:
        return out
    reached = next((e for e in evals if e[f"val_{primary}"] >= target), None)
    out.update(
        {
            "target_accuracy": target,
            "rounds_to_target": None if reached is None else reached["round"],
            "megabytes_to_target": None
            if reached is None
            else (reached["bytes_up_total"] + reached["bytes_down_total"]) / 1e6,
            "seconds_to_target": None if reached is None else reached["elapsed_seconds"],
        }
    )
    return out
