"""What a task's model predicts and how it is scored: the loss, the training hit rate, the metrics.

Each data set names its objective (data/__init__.py); the training loop and the evaluation call
these methods and never branch on the task. Three objectives:

- SingleLabel: one class per example (softmax, cross-entropy); accuracy and macro-F1.
- MultiLabel: any subset of the labels per example (a sigmoid per label, binary cross-entropy
  averaged over examples × labels, a label is predicted when its probability exceeds 1/2);
  micro/macro F1, precision and recall.
- NextToken: causal language modelling; every non-padding token after the first is predicted
  from the ones before it, or, where a batch has token labels (instructions: the response's
  tokens, IGNORE elsewhere), every labelled token; token accuracy and perplexity over them.
  Given a causal LM's hidden states (evaluation.Hidden), the output layer is applied
  CHUNK_LOGITS values at a time (recomputed in the backward pass), so the float32 logits of the
  whole vocabulary are never held for every position at once.

A tally accumulates a split's metrics batch by batch; tallies of disjoint batches merge (sharded
evaluation, distributed.py). Losses are summed exactly (math.fsum), so neither the batch order nor
the sharding changes a metric.

`hits` is what the round reports as train_accuracy (and early stopping compares to its
threshold): correct examples, correct label decisions, or correct next tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_recall_fscore_support
from torch.utils.checkpoint import checkpoint

from flasc.tasks.evaluation import Hidden


# ---------------------------------------------------------------- metric functions
def multilabel_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Micro and macro F1, precision and recall of 0/1 matrices (examples, labels).

    Micro pools every (example, label) decision; macro averages the per-label scores over all
    labels, a label without positives or predictions scoring 0 (sklearn's zero_division=0)."""
    pred, target = np.asarray(pred).astype(int), np.asarray(target).astype(int)
    out = {}
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(target, pred, average=average, zero_division=0)
        out.update({f"{average}_f1": float(f), f"{average}_precision": float(p), f"{average}_recall": float(r)})
    return out


IGNORE = -100  # a token label the loss skips (transformers' convention)
CHUNK_LOGITS = 1 << 25  # float32 logits per chunk of positions: 128 MB (Qwen2's 151,936 words: 220 positions)


def _next_token_targets(outputs, batch: dict):
    """(outputs at the target positions, the tokens they predict): position t predicts token t + 1,
    where t + 1 is a label (a batch with token labels) or not padding (one without)."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        wanted = labels[:, 1:].to(outputs.device)
        keep = wanted != IGNORE
    else:
        keep = batch["attention_mask"][:, 1:].to(outputs.device).bool()
        wanted = batch["input_ids"][:, 1:].to(outputs.device)
    rows = outputs[:, :-1][keep]
    return (rows if isinstance(rows, Hidden) else rows.float()), wanted[keep]


def _chunk_terms(logits: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(logits, wanted, reduction="sum"), (logits.argmax(-1) == wanted).sum()


def token_terms(rows, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token losses, correct tokens) of rows (logits, or Hidden states of the target
    positions) predicting `wanted`. Hidden states meet the output layer in chunks; with gradients
    each chunk's logits are recomputed in the backward pass instead of kept."""
    if not isinstance(rows, Hidden):
        return _chunk_terms(rows, wanted)
    size = max(1, CHUNK_LOGITS // rows.head.weight.shape[0])
    grad = torch.is_grad_enabled() and rows.states.requires_grad
    loss, correct = rows.states.new_zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.long)
    for start in range(0, len(wanted), size):
        h, y = rows.states[start : start + size], wanted[start : start + size]
        chunk = lambda h, y: _chunk_terms(rows.logits(h), y)  # noqa: E731
        part, hits = checkpoint(chunk, h, y, use_reentrant=False) if grad else chunk(h, y)
        loss, correct = loss + part, correct + hits.cpu()
    return loss, correct


def next_token_counts(outputs, batch: dict) -> tuple[torch.Tensor, int, int]:
    """(sum of token losses, correct tokens, tokens) of a batch's target tokens (_next_token_targets)."""
    rows, wanted = _next_token_targets(outputs, batch)
    loss_sum, correct = token_terms(rows, wanted)
    return loss_sum, int(correct), len(wanted)


# ---------------------------------------------------------------- objectives
class _Classification:
    """A classifier head with one output per label."""

    lm_head = False

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    def train_terms(self, logits, batch) -> tuple[torch.Tensor, int, int]:
        """(the loss, hits, units) of one training batch."""
        hits, n = self.hits(logits.detach(), batch)
        return self.loss(logits, batch), hits, n


class SingleLabel(_Classification):
    primary = "accuracy"

    def loss(self, logits, batch):
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    def hits(self, logits, batch) -> tuple[int, int]:
        labels = batch["labels"].to(logits.device)
        return int((logits.argmax(-1) == labels).sum()), len(labels)

    def units(self, batch) -> int:
        """What the loss averages over: examples."""
        return len(batch["labels"])

    def fisher_terms(self, logits_one: torch.Tensor):
        """(log p(y|x), p(y|x)) for every label y: the Fisher is Σ_y p(y|x) (∂ log p(y|x))²."""
        logp = F.log_softmax(logits_one.reshape(-1), -1)
        return [(logp[y], logp[y].exp().detach()) for y in range(len(logp))]

    def tally(self):
        return _SingleLabelTally(self.num_labels)


class _SingleLabelTally:
    def __init__(self, num_labels):
        self.num_labels, self.losses, self.preds, self.labels = num_labels, [], [], []

    def add(self, logits, batch):
        labels = batch["labels"].to(logits.device)
        self.losses.append(F.cross_entropy(logits, labels, reduction="sum").item())
        self.preds.append(logits.argmax(-1).cpu())
        self.labels.append(labels.cpu())

    def merge(self, other: _SingleLabelTally) -> None:
        self.losses += other.losses
        self.preds += other.preds
        self.labels += other.labels

    def result(self) -> dict:
        y_pred = torch.cat(self.preds).numpy() if self.preds else np.zeros(0, dtype=np.int64)
        y_true = torch.cat(self.labels).numpy() if self.labels else np.zeros(0, dtype=np.int64)
        return {
            "loss": math.fsum(self.losses) / max(len(y_true), 1),
            "accuracy": float(np.mean(y_pred == y_true)),
            "macro_f1": float(
                f1_score(y_true, y_pred, average="macro", labels=list(range(self.num_labels)), zero_division=0)
            ),
        }


class MultiLabel(_Classification):
    primary = "micro_f1"

    def loss(self, logits, batch):
        """Binary cross-entropy averaged over examples × labels: transformers' loss for
        multi_label_classification, which the FLASC code trains with. (A sum over labels would
        scale every gradient, so the effective client learning rate, by the number of labels.)"""
        target = batch["labels"].to(logits.device, logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)

    def hits(self, logits, batch) -> tuple[int, int]:
        target = batch["labels"].to(logits.device).bool()
        return int(((logits > 0) == target).sum()), target.numel()

    def units(self, batch) -> int:
        """What the loss averages over: examples × labels."""
        return batch["labels"].numel()

    def fisher_terms(self, logits_one: torch.Tensor):
        """Labels are independent Bernoullis: Σ_labels Σ_{y in 0,1} p(y) (∂ log p(y))²."""
        z = logits_one.reshape(-1)
        on, off = F.logsigmoid(z), F.logsigmoid(-z)
        return [t for j in range(len(z)) for t in ((on[j], on[j].exp().detach()), (off[j], off[j].exp().detach()))]

    def tally(self):
        return _MultiLabelTally()


class _MultiLabelTally:
    def __init__(self):
        self.losses, self.preds, self.targets = [], [], []

    def add(self, logits, batch):
        target = batch["labels"].to(logits.device, logits.dtype)
        self.losses.append(F.binary_cross_entropy_with_logits(logits, target, reduction="sum").item())
        self.preds.append((logits > 0).cpu())
        self.targets.append(target.bool().cpu())

    def merge(self, other: _MultiLabelTally) -> None:
        self.losses += other.losses
        self.preds += other.preds
        self.targets += other.targets

    def result(self) -> dict:
        pred, target = torch.cat(self.preds).numpy(), torch.cat(self.targets).numpy()
        return {"loss": math.fsum(self.losses) / max(target.size, 1), **multilabel_scores(pred, target)}


class NextToken:
    primary = "accuracy"
    lm_head = True

    def loss(self, logits, batch):
        return self.train_terms(logits, batch)[0]

    def hits(self, logits, batch) -> tuple[int, int]:
        _, correct, n = next_token_counts(logits, batch)
        return correct, n

    def train_terms(self, logits, batch) -> tuple[torch.Tensor, int, int]:
        """(mean token loss, correct tokens, tokens) in one pass over the output layer."""
        loss_sum, correct, n = next_token_counts(logits, batch)
        return loss_sum / max(n, 1), correct, n

    def units(self, batch) -> int:
        """The tokens a batch's loss averages over (gradient accumulation weighs batches by them)."""
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 2:
            return int((labels[:, 1:] != IGNORE).sum())
        return int(batch["attention_mask"][:, 1:].sum())

    def fisher_terms(self, logits_one):
        return None  # an exact expectation over the whole vocabulary at every token is out of reach

    def tally(self):
        return _NextTokenTally()


class _NextTokenTally:
    def __init__(self):
        self.losses, self.correct, self.count = [], 0, 0

    def add(self, logits, batch):
        loss_sum, correct, count = next_token_counts(logits, batch)
        self.losses.append(loss_sum.item())
        self.correct += correct
        self.count += count

    def merge(self, other: _NextTokenTally) -> None:
        self.losses += other.losses
        self.correct += other.correct
        self.count += other.count

    def result(self) -> dict:
        loss = math.fsum(self.losses) / max(self.count, 1)
        return {"loss": loss, "accuracy": self.correct / max(self.count, 1), "perplexity": math.exp(min(loss, 700))}
