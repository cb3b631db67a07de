"""The one local-training loop: a group of one or more clients, each trained for its local epochs
(or client_steps optimizer steps) from its own download, with its own optimizer, minibatches and
random streams.

    [LocalClient] + forward  ->  train_local  ->  [(client's flat parameters, training metrics)]

Each step, every client whose round is not over draws its next minibatch (from its own random
streams: augmentation), one forward pass (`forward`) gives each client the logits of its own
rows, the loss is the sum of the clients' own losses (plus an algorithm's penalty), one backward
pass, and then each client, alone: its algorithm's gradient terms and FedProx's pull
(optimizers.adjust_gradients: SCAFFOLD's offset, the proximal term, the client_freeze / tier
mask), its optimizer step, its tallies. A client's epoch ends when its minibatches do; with
early_stopping it stops after the first epoch whose training hit rate reaches the threshold, and
leaves the group. With client_steps it stops after that many optimizer steps instead, its epochs
repeating as needed.

Gradient accumulation (grad_accum G): an optimizer step follows G minibatches (fewer at the end
of an epoch), whose losses are weighted by their share of the step's units (examples, labels or
tokens: objective.units), so a step's gradient is that of its G minibatches as one batch. Then
the gradient is clipped to max_grad_norm (after the algorithm's terms: the clip bounds the step).

Who supplies the forward pass is the only difference between a client trained alone and clients
trained together: alone, the resident model itself (its trainable tensors are the client's);
together, the resident model routed per client over stacked adapters (stacked.py). Since the sum
of the clients' losses separates, each client's gradient is the one it gets alone, and its result
does not depend on the group (float rounding aside).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flasc.client.optimizers import CLIENT_OPTIMIZERS, OptimizerOptions, adjust_gradients
from flasc.options import ConfigError
from flasc.runtime.seeding import ClientStreams

Penalty = Callable[[dict[str, torch.Tensor]], torch.Tensor]

# the options local training reads (the client's minibatches: worker.py)
options = (
    "client_opt",
    "client_lr",
    "client_batch",
    "client_epochs",
    "client_steps",
    "grad_accum",
    "max_grad_norm",
    "client_schedule",
    "client_lr_min",
    "server_rounds",
    "client_momentum",
    "client_beta1",
    "client_beta2",
    "client_eps",
    "client_weight_decay",
    "mu",
    "early_stopping",
    "base_dropout",
    "lora_plus_ratio",
)


def check(cfg) -> None:
    """Early stopping ends a client's round after an epoch; client_steps counts steps, not epochs."""
    if cfg.client_steps and cfg.early_stopping:
        raise ConfigError(
            f"early_stopping: a client stops after an epoch whose accuracy reaches it, and client_steps "
            f"{cfg.client_steps} ends rounds by steps; expected early_stopping: 0 or client_steps: 0"
        )
    if cfg.client_schedule == "constant" and cfg.client_lr_min:
        raise ConfigError(
            "client_lr_min: the lr a client schedule decays to, and client_schedule is constant; expected "
            "client_lr_min: 0 or client_schedule: cosine"
        )
    if cfg.client_lr_min >= cfg.client_lr:
        raise ConfigError(
            f"client_lr_min: {cfg.client_lr_min:g} is not below client_lr {cfg.client_lr:g}; the cosine schedule "
            "decays from client_lr to it"
        )


def client_lr_at(cfg, rnd: int) -> float:
    """The client learning rate of round rnd (from 0): constant, or cosine from client_lr to
    client_lr_min over the rounds, FlowerTune's rule: round t = rnd + 1 of T uses
    lr_min + ½ (lr − lr_min)(1 + cos(π t / T)), so the last round uses lr_min."""
    if cfg.client_schedule == "constant":
        return cfg.client_lr
    t, total = rnd + 1, max(cfg.server_rounds, 1)
    return cfg.client_lr_min + 0.5 * (cfg.client_lr - cfg.client_lr_min) * (
        1 + math.cos(math.pi * min(t, total) / total)
    )


@dataclass(frozen=True)
class TrainingExtras:
    """What an algorithm adds to a client's local training (flasc/algorithms/)."""

    grad_offset: list[torch.Tensor] | None = None  # added to every gradient (SCAFFOLD's c − c_i)
    penalty: Penalty | None = None  # of the named trainable tensors, added to every loss (HetLoRA)


NO_EXTRAS = TrainingExtras()


@dataclass(frozen=True)
class LocalSettings:
    """The options local training reads, for one round."""

    client_opt: str
    client_lr: float  # this round's (client_schedule)
    mu: float  # FedProx
    early_stopping: float  # 0: off
    lora_plus_ratio: float = 1.0  # LoRA+: B's learning rate over A's (and the head's)
    client_steps: int = 0  # 0: client_epochs passes
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    hyper: OptimizerOptions = OptimizerOptions()

    @classmethod
    def of(cls, cfg, rnd: int = 0) -> LocalSettings:
        return cls(
            cfg.client_opt,
            client_lr_at(cfg, rnd),
            cfg.mu,
            cfg.early_stopping,
            cfg.lora_plus_ratio,
            cfg.client_steps,
            cfg.grad_accum,
            cfg.max_grad_norm,
            OptimizerOptions(
                cfg.client_momentum, cfg.client_beta1, cfg.client_beta2, cfg.client_eps, cfg.client_weight_decay
            ),
        )

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
        groups = settings.param_groups(params, names)
        self.opt = CLIENT_OPTIMIZERS[settings.client_opt](groups, settings.client_lr, settings.hyper)
        self.anchors, self.grad_mask, self.extras = anchors, grad_mask, extras
        self.named = dict(zip(names, params)) if extras.penalty is not None else None
        self.epochs, self.epoch = epochs, None
        self.metrics = {"loss_sum": 0.0, "correct": 0, "count": 0, "epochs": 0, "steps": 0}
        self.epoch_correct = self.epoch_count = 0
        self.done = False
        self.last = None
        self.queue: list[dict] = []  # the rest of the current step's minibatches
        self.step_units = 0  # units of the current step's minibatches (their losses' weights)
        self.first_of_step = False

    def _draw(self) -> dict | None:
        """The next minibatch of the client's epochs (None once they are over, or early stopping)."""
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

    def next_batch(self, objective) -> dict | None:
        """The client's next minibatch; None once its round is over (epochs run, client_steps
        taken, or early stopping). A step's minibatches are drawn together (grad_accum of them;
        within one epoch, unless client_steps counts the round), so their weights are known."""
        if self.queue:
            self.first_of_step = False
            return self.queue.pop(0)
        steps = self.settings.client_steps
        if steps and self.metrics["steps"] >= steps and not self.done:
            self.metrics["correct"] += self.epoch_correct  # the tallies of the epoch it stops in
            self.metrics["count"] += self.epoch_count
            self.done = True
        group = [self._draw()]
        if group[0] is None:
            return None
        while len(group) < self.settings.grad_accum:
            # an exhausted epoch stays exhausted: the next _draw ends it, after this step's tallies
            nxt = self._draw() if steps else next(self.epoch, None)
            if nxt is None:
                break
            group.append(nxt)
        self.step_units = sum(objective.units(b) for b in group)
        self.queue, self.first_of_step = group[1:], True
        return group[0]

    @property
    def stepping(self) -> bool:
        """Whether the minibatch just trained on ends the client's optimizer step."""
        return not self.queue

    def end_epoch(self) -> None:
        m, threshold = self.metrics, self.settings.early_stopping
        m["correct"] += self.epoch_correct
        m["count"] += self.epoch_count
        m["epochs"] += 1
        self.epoch = None
        if threshold > 0 and self.epoch_count and self.epoch_correct / self.epoch_count >= threshold:
            self.done = True

    def loss(self, objective, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The objective's loss on the client's rows, weighted by their share of the step's units
        (+ its algorithm's penalty once a step), for the shared backward."""
        loss, hits, n = objective.train_terms(logits, batch)  # units: examples, labels or tokens
        self.last = (loss.detach(), hits, n)
        weighted = loss * (n / self.step_units) if self.step_units else loss * 0
        return (
            weighted
            if self.extras.penalty is None or not self.first_of_step
            else weighted + self.extras.penalty(self.named)
        )

    def step(self) -> None:
        """After the backward pass: the client's tallies, and at the end of its step its gradient
        terms, its clip and its optimizer step."""
        loss, hits, n = self.last
        self.metrics["loss_sum"] += loss.item() * n
        self.epoch_correct += hits
        self.epoch_count += n
        self.last = None
        if not self.stepping:
            return
        adjust_gradients(self.params, self.extras.grad_offset, self.anchors, self.settings.mu, self.grad_mask)
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.settings.max_grad_norm)
        # A zero gradient leaves an entry where it is, except for weight decay, which the optimizer
        # applies to every entry: the entries the mask freezes are put back after the step.
        frozen = self.grad_mask is not None and self.settings.hyper.weight_decay > 0
        held = [p.detach().clone() for p in self.params] if frozen else None
        self.opt.step()
        if frozen:
            with torch.no_grad():
                for p, m, before in zip(self.params, self.grad_mask, held):
                    p.copy_(torch.where(m.bool(), p, before))
        self.metrics["steps"] += 1

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
                batch = client.next_batch(objective)
            if batch is not None:
                active.append(slot)
                batches.append(batch)
        if not active:
            break
        logits = forward(active, batches, streams)
        losses = [clients[slot].loss(objective, own, batch) for slot, own, batch in zip(active, logits, batches)]
        for slot in active:
            if clients[slot].first_of_step:  # gradients accumulate over a step's minibatches
                clients[slot].opt.zero_grad(set_to_none=True)
        (losses[0] if len(losses) == 1 else sum(losses)).backward()
        for slot in active:
            clients[slot].step()
    return [client.result() for client in clients]
