"""The forward pass shared by training, evaluation and merge statistics, and the evaluation loop.

What is scored is the task's objective (objectives.py); this module only feeds batches.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def model_inputs(batch: dict, device: torch.device) -> dict:
    """Everything in a batch except the labels, on the device (input_ids + attention_mask for
    text, pixel_values for images)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}


class Hidden:
    """A causal LM's last hidden states and its output layer, in place of logits: the objective
    applies the output layer a chunk of positions at a time (objectives.py), so that logits over
    the whole vocabulary are never held for every position at once. Sliced like logits."""

    def __init__(self, states: torch.Tensor, head: torch.nn.Module, bf16: bool):
        self.states, self.head, self.bf16 = states, head, bf16

    def __getitem__(self, key) -> Hidden:
        return Hidden(self.states[key], self.head, self.bf16)

    def dim(self) -> int:
        return self.states.dim()

    def detach(self) -> Hidden:
        return Hidden(self.states.detach(), self.head, self.bf16)

    @property
    def device(self) -> torch.device:
        return self.states.device

    def logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        """The output layer on `states` (default: all of them), in float32."""
        states = self.states if states is None else states
        with autocast(states.device, self.bf16):
            return self.head(states.to(self.head.weight.dtype)).float()


def logits_of(model, batch: dict, device: torch.device, bf16: bool) -> torch.Tensor | Hidden:
    """The model's outputs on a batch: its logits, or for a causal LM whose logits are its output
    layer on its last hidden state (models.lm_parts), those hidden states (Hidden)."""
    inputs = model_inputs(batch, device)
    pixels = getattr(model, "flasc_pixel_dtype", None)  # models.build_base: a base of lower precision
    if pixels is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(pixels)
    parts = getattr(model, "flasc_lm", None)
    with autocast(device, bf16):
        if parts is not None:
            return Hidden(parts.body(**inputs)[0], parts.head, bf16)
        out = model(**inputs)
    return out.logits.float()


def full_logits(outputs: torch.Tensor | Hidden) -> torch.Tensor:
    """Logits from logits_of's outputs, for the few places that need all of them (small probes)."""
    return outputs.logits() if isinstance(outputs, Hidden) else outputs


class Subset:
    """Some examples of a split, in the split's interface (len, batch of positions)."""

    def __init__(self, split, idx: torch.Tensor):
        self.split, self.idx = split, idx

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, positions: torch.Tensor) -> dict:
        return self.split.batch(self.idx[positions])


@torch.no_grad()
def evaluate(model, split, objective, batch_size: int, device: torch.device, bf16: bool, world=None) -> dict:
    """The objective's metrics of the model on a whole split (model left in its previous mode).
    With a world of N ranks (distributed.World), rank r scores batches r, r + N, ... and the
    tallies are combined: the batches are those of one process, and tallies are order-free (exact
    sums, counts), so the metrics are those of world size 1."""
    was_training = model.training
    model.eval()
    tally = objective.tally()
    starts = range(0, len(split), batch_size)
    if world is not None:
        starts = starts[world.rank :: world.size]
    for start in starts:
        batch = split.batch(torch.arange(start, min(start + batch_size, len(split))))
        tally.add(logits_of(model, batch, device, bf16), batch)
    model.train(was_training)
    if world is not None:
        tally = world.combine(tally)
    return tally.result()
