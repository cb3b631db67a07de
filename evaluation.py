"""Loss, accuracy and macro-F1 of a classifier on a split, and the forward pass shared with training."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def logits_of(model, batch: dict, device: torch.device, bf16: bool) -> torch.Tensor:
    with autocast(device, bf16):
        out = model(input_ids=batch["input_ids"].to(device, non_blocking=True),
                    attention_mask=batch["attention_mask"].to(device, non_blocking=True))
    return out.logits.float()


@torch.no_grad()
def evaluate(model, split, batch_size: int, device: torch.device, bf16: bool, num_labels: int) -> dict:
    was_training = model.training
    model.eval()
    loss_sum, preds = 0.0, []
    for start in range(0, len(split), batch_size):
        batch = split.batch(torch.arange(start, min(start + batch_size, len(split))))
        logits = logits_of(model, batch, device, bf16)
        labels = batch["labels"].to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
    model.train(was_training)
    y_pred = torch.cat(preds).numpy()
    y_true = split.labels.numpy()
    return {
        "loss": loss_sum / len(split),
        "accuracy": float(np.mean(y_pred == y_true)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(num_labels)),
                                   zero_division=0)),
    }
