"""The forward pass of clients trained together (client_parallelism K > 1): the minibatches of up
to K clients in one pass of the resident model, each row meeting only its own client's adapter and
head. The training loop itself is local.py's, the same as for a client alone.

The frozen base model's layers run once over the concatenated minibatches; at every LoRA layer the
rows of client k add x_k A_kᵀ B_kᵀ · scaling (one batched matrix product over the clients when
their minibatches are the same size), and the head applies client k's weights to client k's rows.
Dropout masks are drawn client by client, on the client's own rows at its own sequence width,
from the client's own generators (seeding.ClientStreams), so a client draws exactly what it draws
trained alone. docs/scaling.md says where this applies and what it gains.

Why not peft's mixed-adapter batches: they refuse training mode and route rows adapter by adapter.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flasc.models.params import fixed_b
from flasc.options import ConfigError
from flasc.runtime.seeding import ClientStreams
from flasc.tasks.evaluation import logits_of
from flasc.tasks.objectives import IGNORE

options = ("client_parallelism",)


def linear_lora_layers() -> tuple[type, ...]:
    """peft's LoRA layers of linear layers: torch's (and GPT-2's Conv1D), bitsandbytes' 8- and 4-bit."""
    import peft.tuners.lora as lora  # its bitsandbytes layers exist only where bitsandbytes is installed

    quantized = (getattr(lora, name, None) for name in ("Linear8bitLt", "Linear4bit"))
    return (lora.Linear, *(cls for cls in quantized if cls is not None))


def check(cfg) -> None:
    """Clients trained together route rows through stacked LoRA factors of linear layers and linear
    heads; nothing else can be stacked."""
    if cfg.client_parallelism <= 1:
        return
    from flasc.models import resolve_name, spec_of

    if cfg.lora_rank < 0:
        raise ConfigError(
            "client_parallelism: clients trained together share the frozen base model and stack "
            "their adapters; full fine-tuning (lora_rank -1) trains the base itself; expected "
            "client_parallelism: 1 or lora_rank >= 0"
        )
    if cfg.use_dora:
        raise ConfigError(
            "client_parallelism: clients trained together share one pass of the base and add their own "
            "B·A products; DoRA rescales each client's whole weight by its own magnitude and norm; expected "
            "client_parallelism: 1 or use_dora: false"
        )
    if not spec_of(cfg).linear_lora:
        raise ConfigError(
            f"client_parallelism: stacked adapters are LoRA of linear layers; model "
            f"{resolve_name(cfg)} adapts convolutions (and draws its stochastic depth outside "
            "dropout layers); expected client_parallelism: 1"
        )


@dataclass
class Rows:
    """Where each active client's rows are in a step's concatenated minibatch."""

    slots: list[int]  # the clients (their places in the group), in row order
    starts: list[int]
    counts: list[int]
    widths: list[int] | None  # text: each client's own sequence width (its minibatch's longest)
    width: int = 0  # text: the common (padded) width

    def slices(self):
        for slot, start, count in zip(self.slots, self.starts, self.counts):
            yield slot, slice(start, start + count)

    @property
    def equal(self) -> bool:
        return len(set(self.counts)) == 1


def concatenate(batches: list[dict], pad_token_id: int | None) -> tuple[dict, list[int] | None, int]:
    """The minibatches as one: text padded on the right to the longest width (pad token, attention
    mask 0, token labels IGNORE), everything else concatenated. Returns the batch, each one's width (None for images)
    and the common width."""
    if "input_ids" not in batches[0]:
        return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}, None, 0
    widths = [b["input_ids"].shape[1] for b in batches]
    width = max(widths)
    pads = {"input_ids": 0 if pad_token_id is None else pad_token_id, "attention_mask": 0, "labels": IGNORE}
    out = {}
    for key in batches[0]:
        if key in pads and batches[0][key].dim() == 2:  # (a text batch's 2-D labels are token labels)
            out[key] = torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=pads[key]) for b in batches])
        else:
            out[key] = torch.cat([b[key] for b in batches])
    return out, widths, width


class StackedModel:
    """The resident model's LoRA layers, heads, dropouts and attention routed per client while
    `engaged`; `step` says, for one pass, whose rows are where and whose tensors they meet."""

    def __init__(self, model: torch.nn.Module, flat):
        lora_linear = linear_lora_layers()
        self.model, self.flat = model, flat
        index = {id(p): i for i, p in enumerate(flat.params)}
        covered: set[int] = set()
        self.lora, self.heads = [], []
        for module in model.modules():
            if isinstance(module, lora_linear) and "default" in module.lora_A:
                a, fixed = module.lora_A["default"].weight, fixed_b(module)
                # Fed-SB: the trained tensor is R in B·R, B fixed
                b = (
                    module.lora_B["default"].weight
                    if fixed is None
                    else module.lora_B["default"].parametrizations.weight.original
                )
                spec = (module, index.get(id(a)), index[id(b)], a.detach(), float(module.scaling["default"]), fixed)
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
        self.params: dict[int, list[torch.Tensor]] = {}  # slot -> that client's tensors (FlatParams order)
        self.streams: ClientStreams | None = None
        self._originals: dict = {}

    # -- routing
    def per_client_linear(self, x: torch.Tensor, index: int, bias: int | None) -> torch.Tensor:
        """Each client's rows of x times that client's tensor `index` (transposed), plus its `bias`."""
        rows = self.rows
        weights = [self.params[slot][index] for slot in rows.slots]
        biases = None if bias is None else [self.params[slot][bias] for slot in rows.slots]
        if rows.equal:  # one batched product over the clients
            k = len(rows.slots)
            y = torch.bmm(x.reshape(k, -1, x.shape[-1]), torch.stack(weights).transpose(1, 2))
            if biases is not None:
                y = y + torch.stack(biases).unsqueeze(1)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return torch.cat(
            [
                F.linear(x[s], weights[i], None if biases is None else biases[i])
                for i, (_, s) in enumerate(rows.slices())
            ]
        )

    def lora_forward(self, spec, x, *args, **kwargs):
        module, a, b, frozen_a, scaling, fixed = spec
        result = module.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        x = module.lora_dropout["default"](x.to(module.lora_A["default"].weight.dtype))  # routed if a dropout
        down = F.linear(x, frozen_a) if a is None else self.per_client_linear(x, a, None)
        up = self.per_client_linear(down, b, None)  # B, or Fed-SB's R before its fixed B
        if fixed is not None:
            up = F.linear(up, fixed)
        return (result + up * scaling).to(dtype)

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
                out, _ = original(
                    module, query[s, :, :w], key[s, :, :w], value[s, :, :w], mask, dropout=dropout, **kwargs
                )
            if w < query.shape[2]:  # back to the common width: (rows, width, heads, head size)
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


def group_forward(
    stacked: StackedModel,
    params_of: list[list[torch.Tensor]],
    device: torch.device,
    bf16: bool,
    pad_token_id: int | None,
):
    """The forward pass of local.train_local for clients trained together: their minibatches
    concatenated into one pass of the routed model (`stacked` engaged), each client's logits cut
    back to its own rows (and, for text, its own width). params_of[slot]: that client's tensors."""

    def forward(active: list[int], batches: list[dict], streams) -> list[torch.Tensor]:
        batch, widths, width = concatenate(batches, pad_token_id)
        counts = [len(next(iter(b.values()))) for b in batches]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        stacked.rows = Rows(active, starts, counts, widths, width)
        stacked.params = {slot: params_of[slot] for slot in active}
        logits = logits_of(stacked.model, batch, device, bf16)
        return [
            logits[s] if logits.dim() < 3 or widths is None else logits[s, : widths[i]]
            for i, (_, s) in enumerate(stacked.rows.slices())
        ]

    return forward
