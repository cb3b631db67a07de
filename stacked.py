"""Clients trained together (client_parallelism K > 1): one forward and backward pass over the
minibatches of up to K clients, each row meeting only its own client's adapter and head.

The frozen base model's layers run once over the concatenated minibatches; at every LoRA layer the
rows of client k add x_k A_kᵀ B_kᵀ · scaling (one batched matrix product over the clients when
their minibatches are the same size), and the head applies client k's weights to client k's rows.
The loss is the sum over clients of each client's own loss, so the gradient reaching a client's
tensors is the one it would get trained alone. Each client keeps its tensors as its own leaves with
its own optimizer; a client whose round is over (fewer minibatches, early stopping) drops out of
the next passes and takes no further optimizer steps.

Random draws are the client's own. Each client has its own copy of torch's global generators
(CPU, and the device's), swapped in around everything it draws: its augmentation while its
minibatch is built, and its dropout masks, drawn on its own rows at its own sequence width. A
client therefore draws exactly what it draws trained alone, in any group, in the same order.

Why not peft's mixed-adapter batches: they refuse training mode and route rows adapter by adapter.
Where this applies: LoRA on linear layers (peft's lora.Linear) and linear heads; config.py refuses
the rest (full fine-tuning, LoRA on convolutions).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import models
import seeding
from evaluation import logits_of
from optimizers import CLIENT_OPTIMIZERS, adjust_gradients


class ClientStreams:
    """Each client's own state of torch's global generators (CPU and this device's), seeded per
    (seed, round, client) as a client trained alone seeds them."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.states = []
        for seed in seeds:
            torch.manual_seed(seed)
            self.states.append(self._get())

    def _get(self):
        return (torch.get_rng_state(),
                None if self.device is None else torch.cuda.get_rng_state(self.device))

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if self.device is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextmanager
    def use(self, k: int):
        """Client k's generators for the draws inside the block."""
        self._set(self.states[k])
        try:
            yield
        finally:
            self.states[k] = self._get()


@dataclass
class Rows:
    """Where each active client's rows are in a step's concatenated minibatch."""
    slots: list[int]         # the clients (their places in the group), in row order
    starts: list[int]
    counts: list[int]
    widths: list[int] | None  # text: each client's own sequence width (its minibatch's longest)
    width: int = 0            # text: the common (padded) width

    def slices(self):
        for slot, start, count in zip(self.slots, self.starts, self.counts):
            yield slot, slice(start, start + count)

    @property
    def equal(self) -> bool:
        return len(set(self.counts)) == 1


def concatenate(batches: list[dict], pad_token_id: int | None) -> tuple[dict, list[int] | None, int]:
    """The minibatches as one: text padded on the right to the longest width (pad token, attention
    mask 0), everything else concatenated. Returns the batch, each one's width (None for images)
    and the common width."""
    if "input_ids" not in batches[0]:
        return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}, None, 0
    widths = [b["input_ids"].shape[1] for b in batches]
    width = max(widths)
    pads = {"input_ids": 0 if pad_token_id is None else pad_token_id, "attention_mask": 0}
    out = {}
    for key in batches[0]:
        if key in pads:
            out[key] = torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=pads[key]) for b in batches])
        else:
            out[key] = torch.cat([b[key] for b in batches])
    return out, widths, width


class StackedModel:
    """The resident model's LoRA layers, heads, dropouts and attention routed per client while
    `engaged`; `step` says, for one pass, whose rows are where and whose tensors they meet."""

    def __init__(self, model: torch.nn.Module, flat):
        from peft.tuners.lora import Linear as LoraLinear
        self.model, self.flat = model, flat
        index = {id(p): i for i, p in enumerate(flat.params)}
        covered: set[int] = set()
        self.lora, self.heads = [], []
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear) and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                spec = (module, index.get(id(a)), index[id(b)], a.detach(), float(module.scaling["default"]))
                self.lora.append(spec)
                covered.update(i for i in spec[1:3] if i is not None)
            elif type(module) is torch.nn.Linear and index.get(id(module.weight)) not in covered | {None}:
                bias = None if module.bias is None else index.get(id(module.bias))
                self.heads.append((module, index[id(module.weight)], bias))
                covered.update(i for i in (index[id(module.weight)], bias) if i is not None)
        left = [flat.names[i] for i in range(len(flat.params)) if i not in covered]
        if left:
            raise ValueError(f"{left[0]} is neither a LoRA factor of a linear layer nor a linear head's")
        self.dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        self.rows: Rows | None = None
        self.params: dict[int, list[torch.Tensor]] = {}   # slot -> that client's tensors (FlatParams order)
        self.streams: ClientStreams | None = None
        self._originals: dict = {}

    # -- routing
    def per_client_linear(self, x: torch.Tensor, index: int, bias: int | None) -> torch.Tensor:
        """Each client's rows of x times that client's tensor `index` (transposed), plus its `bias`."""
        rows = self.rows
        weights = [self.params[slot][index] for slot in rows.slots]
        biases = None if bias is None else [self.params[slot][bias] for slot in rows.slots]
        if rows.equal:   # one batched product over the clients
            k = len(rows.slots)
            y = torch.bmm(x.reshape(k, -1, x.shape[-1]), torch.stack(weights).transpose(1, 2))
            if biases is not None:
                y = y + torch.stack(biases).unsqueeze(1)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return torch.cat([F.linear(x[s], weights[i], None if biases is None else biases[i])
                          for i, (_, s) in enumerate(rows.slices())])

    def lora_forward(self, spec, x, *args, **kwargs):
        module, a, b, frozen_a, scaling = spec
        result = module.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        x = module.lora_dropout["default"](x.to(module.lora_A["default"].weight.dtype))   # routed if a dropout
        down = F.linear(x, frozen_a) if a is None else self.per_client_linear(x, a, None)
        return (result + self.per_client_linear(down, b, None) * scaling).to(dtype)

    def dropout(self, module: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
        """nn.Dropout's forward, each client's rows masked from its own generators at its own width."""
        if not module.training or module.p == 0:
            return F.dropout(x, module.p, module.training, module.inplace)
        rows, pieces = self.rows, []
        trim = rows.widths is not None and x.dim() >= 3 and x.shape[1] == rows.width
        for i, (slot, s) in enumerate(rows.slices()):
            own = x[s]
            with self.streams.use(slot):
                if trim and rows.widths[i] < rows.width:
                    w = rows.widths[i]
                    pieces.append(torch.cat([F.dropout(own[:, :w].contiguous(), module.p, True), own[:, w:]], 1))
                else:
                    pieces.append(F.dropout(own.contiguous(), module.p, True))
        return torch.cat(pieces)

    def attention(self, original, module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
        """The model's attention; with dropout on, called client by client on its own rows and
        width, from its own generators, as it is called when the client trains alone."""
        if not dropout or self.rows is None:
            return original(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
        rows, outs = self.rows, []
        for i, (slot, s) in enumerate(rows.slices()):
            w = query.shape[2] if rows.widths is None else rows.widths[i]
            mask = None
            if attention_mask is not None:
                mask = attention_mask[s]
                mask = mask[..., :w] if mask.shape[-2] == 1 else mask[..., :w, :w]
            with self.streams.use(slot):
                out, _ = original(module, query[s, :, :w], key[s, :, :w], value[s, :, :w], mask,
                                  dropout=dropout, **kwargs)
            if w < query.shape[2]:   # back to the common width: (rows, width, heads, head size)
                out = F.pad(out, (0, 0, 0, 0, 0, query.shape[2] - w))
            outs.append(out)
        return torch.cat(outs), None

    # -- engaging the routes
    @contextmanager
    def engaged(self, streams: ClientStreams):
        """Every LoRA layer, head, dropout and attention routed per client inside the block."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        self.streams = streams
        patched = []
        for spec in self.lora:
            spec[0].forward = lambda x, *a, _spec=spec, **kw: self.lora_forward(_spec, x, *a, **kw)
            patched.append(spec[0])
        for module, w, b in self.heads:
            module.forward = lambda x, _w=w, _b=b: self.per_client_linear(x, _w, _b)
            patched.append(module)
        for module in self.dropouts:
            module.forward = lambda x, _m=module: self.dropout(_m, x)
            patched.append(module)
        overridden = {}
        for impl, original in self._attention_originals().items():
            overridden[impl] = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
            ALL_ATTENTION_FUNCTIONS[impl] = lambda m, *a, _o=original, **kw: self.attention(_o, m, *a, **kw)
        try:
            yield self
        finally:
            for module in patched:
                del module.forward
            for impl, previous in overridden.items():
                if previous is None:
                    del ALL_ATTENTION_FUNCTIONS[impl]
                else:
                    ALL_ATTENTION_FUNCTIONS[impl] = previous
            self.rows, self.params, self.streams = None, {}, None

    def _attention_originals(self) -> dict:
        """attn_implementation -> the function the model's attention layers call for it."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        if not self._originals:
            for module in self.model.modules():
                config = getattr(module, "config", None)
                impl = getattr(config, "_attn_implementation", None)
                if impl is None or impl in self._originals:
                    continue
                eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
                if impl == "eager" and eager is not None:
                    self._originals[impl] = eager
                elif impl in ALL_ATTENTION_FUNCTIONS:
                    self._originals[impl] = ALL_ATTENTION_FUNCTIONS[impl]
        return self._originals


class _Client:
    """One client's local training inside a group: its tensors, optimizer, minibatches, metrics."""

    def __init__(self, worker, rnd: int, job):
        cfg, flat = worker.cfg, worker.flat
        self.job, self.cfg = job, cfg
        self.params = [chunk.view_as(p).to(p.dtype).clone().requires_grad_(True)
                       for p, chunk in zip(flat.params, job.start.split(flat.numels))]
        self.opt = CLIENT_OPTIMIZERS[cfg.client_opt](self.params, cfg.client_lr)
        self.anchors = flat.split(job.start) if cfg.mu > 0 else None
        self.mask = None if job.plan.train is None else flat.split(job.plan.train.to(job.start.dtype))
        self.offset = job.training.get("grad_offset")
        self.penalty = job.training.get("penalty")
        self.named = dict(zip(flat.names, self.params)) if self.penalty is not None else None
        self.epochs = worker.client_epochs(rnd, job.client_id)
        self.epoch = None
        self.metrics = {"loss_sum": 0.0, "correct": 0, "count": 0, "epochs": 0, "steps": 0}
        self.epoch_correct = self.epoch_count = 0
        self.done = False

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
        m, threshold = self.metrics, self.cfg.early_stopping
        m["correct"] += self.epoch_correct
        m["count"] += self.epoch_count
        m["epochs"] += 1
        self.epoch = None
        if threshold > 0 and self.epoch_count and self.epoch_correct / self.epoch_count >= threshold:
            self.done = True

    def loss(self, objective, logits, batch) -> torch.Tensor:
        loss = objective.loss(logits, batch)
        self.last = (loss, logits.detach(), batch)
        return loss if self.penalty is None else loss + self.penalty(self.named)

    def step(self, objective) -> None:
        """After the shared backward pass: the client's gradient terms, its optimizer step, its tallies."""
        adjust_gradients(self.params, self.offset, self.anchors, self.cfg.mu, self.mask)
        self.opt.step()
        loss, logits, batch = self.last
        hits, n = objective.hits(logits, batch)
        self.metrics["loss_sum"] += loss.item() * n
        self.metrics["steps"] += 1
        self.epoch_correct += hits
        self.epoch_count += n

    def result(self) -> tuple[torch.Tensor, dict]:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params]), self.metrics


def train_together(worker, rnd: int, jobs: list) -> list[tuple[torch.Tensor, dict]]:
    """Each job's client trained locally, all of them in shared passes; for each, what
    ClientWorker.train_client returns for it alone: its flat parameters and training metrics."""
    cfg, model, device = worker.cfg, worker.resident.model, worker.resident.device
    stacked = worker.stacked()
    streams = ClientStreams([seeding.derive_seed(cfg.seed, "client", rnd, j.client_id, 1) for j in jobs], device)
    runs = [_Client(worker, rnd, job) for job in jobs]
    objective = worker.task.objective
    models.training_mode(model, cfg.base_dropout)
    pad = getattr(model.config, "pad_token_id", None)
    with stacked.engaged(streams):
        while True:
            active, batches = [], []
            for slot, run in enumerate(runs):
                with streams.use(slot):   # augmentation draws from the client's own generators
                    batch = run.next_batch()
                if batch is not None:
                    active.append(slot)
                    batches.append(batch)
            if not active:
                break
            batch, widths, width = concatenate(batches, pad)
            counts = [len(next(iter(b.values()))) for b in batches]
            starts = [sum(counts[:i]) for i in range(len(counts))]
            stacked.rows = Rows(active, starts, counts, widths, width)
            stacked.params = {slot: runs[slot].params for slot in active}
            logits = logits_of(model, batch, device, cfg.bf16)
            total = 0
            for i, (slot, s) in enumerate(stacked.rows.slices()):
                own = logits[s] if logits.dim() < 3 or widths is None else logits[s, :widths[i]]
                total = total + runs[slot].loss(objective, own, batches[i])
            for slot in active:
                runs[slot].opt.zero_grad(set_to_none=True)
            total.backward()
            for slot in active:
                runs[slot].step(objective)
    return [run.result() for run in runs]
