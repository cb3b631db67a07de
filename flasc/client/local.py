"""The one local-training loop: a group of one or more clients, each trained for its local epochs
from its own download, with its own optimizer, minibatches and random streams.

    [LocalClient] + forward  ->  train_local  ->  [(client's flat parameters, training metrics)]

Each step, every client whose round is not over draws its next minibatch (from its own random
streams: augmentation), one forward pass (`forward`) gives each client the logits of its own
rows, the loss is the sum of the clients' own losses (plus an algorithm's penalty), one backward
pass, and then each client, alone: its algorithm's gradient terms and FedProx's pull
(optimizers.adjust_gradients: SCAFFOLD's offset, the proximal term, the client_freeze / tier
mask), its optimizer step, its tallies. A client's epoch ends when its minibatches do; with
early_stopping it stops after the first epoch whose training hit rate reaches the threshold, and
leaves the group.

Who supplies the forward pass is the only difference between a client trained alone and clients
trained together: alone, the resident model itself (its trainable tensors are the client's);
together, the resident model routed per client over stacked adapters (stacked.py). Since the sum
of the clients' losses separates, each client's gradient is the one it gets alone, and its result
does not depend on the group (float rounding aside).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flasc.client.optimizers import CLIENT_OPTIMIZERS, adjust_gradients
from flasc.runtime.seeding import ClientStreams

Penalty = Callable[[dict[str, torch.Tensor]], torch.Tensor]

# the options local training reads (the client's minibatches: worker.py)
options = (
    "client_opt",
    "client_lr",
    "client_batch",
    "client_epochs",
    "mu",
    "early_stopping",
    "base_dropout",
    "lora_plus_ratio",
)


@dataclass(frozen=True)
class TrainingExtras:
    """What an algorithm adds to a client's local training (flasc/algorithms/)."""

    grad_offset: list[torch.Tensor] | None = None  # added to every gradient (SCAFFOLD's c − c_i)
    penalty: Penalty | None = None  # of the named trainable tensors, added to every loss (HetLoRA)


NO_EXTRAS = TrainingExtras()


@dataclass(frozen=True)
class LocalSettings:
    """The options local training reads, once per run."""

    client_opt: str
    client_lr: float
    mu: float  # FedProx
    early_stopping: float  # 0: off
    lora_plus_ratio: float = 1.0  # LoRA+: B's learning rate over A's (and the head's)

    @classmethod
    def of(cls, cfg) -> LocalSettings:
        return cls(cfg.client_opt, cfg.client_lr, cfg.mu, cfg.early_stopping, cfg.lora_plus_ratio)

    def param_groups(self, params: list[torch.Tensor], names: list[str]) -> list[dict]:
        """The client optimizer's parameter groups: with LoRA+ (Hayou et al. 2024) the B factors
        learn at lora_plus_ratio × client_lr, everything else at client_lr."""
        if self.lora_plus_ratio == 1:
            return [{"params": params}]
        is_b = [".lora_B." in n for n in names]
        groups = [
            {"params": [p for p, b in zip(params, is_b) if not b]},
            {"params": [p for p, b in zip(params, is_b) if b], "lr": self.client_lr * self.lora_plus_ratio},
        ]
        return [g for g in groups if g["params"]]


class LocalClient:
    """One client's local training: its trainable tensors (leaves the optimizer steps), its
    minibatches epoch by epoch, the gradient terms it adds, its tallies."""

    def __init__(
        self,
        params: list[torch.Tensor],
        names: list[str],
        epochs: Iterator[Iterator[dict]],
        settings: LocalSettings,
        anchors: list[torch.Tensor] | None,
        grad_mask: list[torch.Tensor] | None,
        extras: TrainingExtras = NO_EXTRAS,
    ):
        self.params, self.settings = params, settings
        self.opt = CLIENT_OPTIMIZERS[settings.client_opt](settings.param_groups(params, names), settings.client_lr)
        self.anchors, self.grad_mask, self.extras = anchors, grad_mask, extras
        self.named = dict(zip(names, params)) if extras.penalty is not None else None
        self.epochs, self.epoch = epochs, None
        self.metrics = {"loss_sum": 0.0, "correct": 0, "count": 0, "epochs": 0, "steps": 0}
        self.epoch_correct = self.epoch_count = 0
        self.done = False
        self.last = None

    def next_batch(self) -> dict | None:
        """The client's next minibatch; None once its round is over (epochs run, or early stopping)."""
        while not self.done:
            if self.epoch is None:
                self.epoch = next(self.epochs, None)
                self.epoch_correct = self.epoch_count = 0
                if self.epoch is None:
                    self.done = True
                    break
            batch = next(self.epoch, None)
            if batch is not None:
                return batch
            self.end_epoch()
        return None

    def end_epoch(self) -> None:
        m, threshold = self.metrics, self.settings.early_stopping
        m["correct"] += self.epoch_correct
        m["count"] += self.epoch_count
        m["epochs"] += 1
        self.epoch = None
        if threshold > 0 and self.epoch_count and self.epoch_correct / self.epoch_count >= threshold:
            self.done = True

    def loss(self, objective, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The objective's loss on the client's rows (+ its algorithm's penalty), for the shared backward."""
        loss = objective.loss(logits, batch)
        self.last = (loss, logits.detach(), batch)
        return loss if self.extras.penalty is None else loss + self.extras.penalty(self.named)

    def step(self, objective) -> None:
        """After the backward pass: the client's gradient terms, its optimizer step, its tallies."""
        adjust_gradients(self.params, self.extras.grad_offset, self.anchors, self.settings.mu, self.grad_mask)
        self.opt.step()
        loss, logits, batch = self.last
        hits, n = objective.hits(logits, batch)  # units: examples, labels or tokens
        self.metrics["loss_sum"] += loss.item() * n
        self.metrics["steps"] += 1
        self.epoch_correct += hits
        self.epoch_count += n
        self.last = None

    def result(self) -> tuple[torch.Tensor, dict]:
        """The client's flat fp32 parameters and its training metrics."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params]), self.metrics


# forward(slots, batches, streams) -> each client's logits on its own minibatch, in the order given
Forward = Callable[[list[int], list[dict], ClientStreams], list[torch.Tensor]]


def train_local(
    clients: list[LocalClient], forward: Forward, objective, streams: ClientStreams
) -> list[tuple[torch.Tensor, dict]]:
    """Train the group to the end of every client's round; each client's (flat parameters, metrics)."""
    while True:
        active, batches = [], []
        for slot, client in enumerate(clients):
            with streams.use(slot):  # augmentation draws from the client's own generators
                batch = client.next_batch()
            if batch is not None:
                active.append(slot)
                batches.append(batch)
        if not active:
            break
        logits = forward(active, batches, streams)
        losses = [clients[slot].loss(objective, own, batch) for slot, own, batch in zip(active, logits, batches)]
        for slot in active:
            clients[slot].opt.zero_grad(set_to_none=True)
        (losses[0] if len(losses) == 1 else sum(losses)).backward()
        for slot in active:
            clients[slot].step(objective)
    return [client.result() for client in clients]
