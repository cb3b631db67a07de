"""Federated algorithms (option `algorithm`): where each client starts, what it keeps between
rounds, what it sends, and how the server turns what it receives into the next global model.

    fedavg    the generic round: merging_strategy in merge_space, then server_opt (everything else
              in flasc: FedAvg, FedOpt, FedProx, FFA-LoRA with freeze_a, FLASC, the merges)
    fedsa     FedSA-LoRA: A aggregated, each client's B (and head) stay on the client
    scaffold  SCAFFOLD option II: control variates correct the local gradients
    fedex     FedEx-LoRA: A and B averaged, the residual of the average folded into W0
    flora     FLoRA: fresh adapters each round, stacked exactly and folded into W0
    flexlora  FlexLoRA: the weighted mean of the clients' B·A, truncated by SVD to each rank
    hetlora   HetLoRA: zero-padded ranks, weights by the norm of each client's B·A, optional
              rank self-pruning
    rolora    RoLoRA: rounds alternate between training B (A frozen) and A (B frozen), each averaged
    fedsb     Fed-SB: B and A fixed from LoRA-SB's initialisation, only the r × r R between them
              trained and averaged
    fedsvd    FedSVD: B trained and averaged, then B̄·A re-factored by SVD (A orthonormal)
    lorafair  LoRA-FAIR: A and B averaged, B̄ corrected by a ridge least-squares residual

An algorithm has these hooks, called in this order each round by train_lora.Federation.run_round:
`prepare` (a client's job from its tier's download and its stored state; pure), the local training
extras the job carries (`extras`: flasc/client/local.py's TrainingExtras, a gradient offset or a
penalty), `finish` (after local training: the client's new state and anything it sends besides
its update), `aggregate` (the pseudo-gradient the server optimizer applies), `downloaded` (after
the server step: what the sampled clients now hold) and `after_step` (what follows the server
step). Per-client vectors live in flasc/client/state_store.py; small per-client facts and
server-side extras (SCAFFOLD's c, the base-weight delta) are this object's `state_dict`.

Each algorithm declares the options it reads (`options`) and refuses the combinations its paper
leaves undefined (`check`, asked by config.py). Bytes of every message are counted where it is
made; docs/algorithms.md tabulates what each algorithm sends. Adding an algorithm touches its file
here, its registration in __init__.py, its config (configs/NAME.yaml) and its test.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

import merging
from flasc.federation import tiers as tiers_mod
from flasc.federation.base_weights import BaseDelta
from flasc.federation.communication import VALUE_BYTES
from flasc.options import ConfigError


def _named_factors(flat, pair, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a layer in a flat vector (A the frozen one under freeze_a)."""
    named = flat.named(vector)
    a = pair.frozen_a.to(vector.device) if pair.a is None else named[pair.a]
    return a, named[pair.b]


def _factor_and_head(flat, pairs, factor: str, lora: torch.Tensor) -> torch.Tensor:
    """Flat mask of every layer's factor `factor` ("a" or "b") and of everything that is not LoRA
    (the head): what a client trains while the other factor stays frozen."""
    mask = ~lora
    named = flat.named(mask)
    for pair in pairs:
        named[getattr(pair, factor)][:] = True
    return mask


def _components(pair, mask: torch.Tensor | None, flat) -> int:
    """Rank of a layer's download (components whose B column the mask keeps)."""
    if mask is None:
        return pair.rank
    return int(flat.named(mask)[pair.b].any(dim=0).sum())


class FedAvg:
    """The generic round (the default): the configured merging strategy and server optimizer."""

    name = "fedavg"
    state_numel = 0  # length of each client's stored state (0: the clients keep nothing)
    folds_base = False  # keeps a server-side delta of the base weights (base_weights.py)
    shared_start = True  # every client of a tier starts from the same download
    # What the other methods are, for the combinations they refuse (check):
    options: tuple[str, ...] = ("algorithm", "clients", "weighting")  # the keys this algorithm reads
    needs_lora = True  # works on LoRA adapters (lora_rank >= 1)
    sets_server = False  # sets the server's model itself (no server optimizer step of its own)
    rank_tiers = True  # with tiers, gives each tier a rank (syshet: rank)
    learns_a: str | None = None  # why A must train (freeze_a refused), if it must
    needs_linear_lora = False  # works on products B·A of linear layers
    prunes_rank = False  # hetlora_prune means something
    fresh_adapters = False  # draws each client a fresh adapter every round (init_lora_weights does not apply)
    personalised = False  # its own figure is the clients' personalised score (eval_personalized), not the global one

    @classmethod
    def check(cls, cfg) -> None:
        """The options that combine with this algorithm (ConfigError names the first that does not).
        fedavg is the generic round: everything flasc has runs with it; each method refuses what
        its paper leaves undefined (docs/algorithms.md, "Which combinations mean something")."""
        a = cls.name
        if cfg.hetlora_prune and not cls.prunes_rank:
            raise ConfigError(
                f"hetlora_prune: rank self-pruning is HetLoRA's; expected algorithm: hetlora or "
                f"hetlora_prune: false (algorithm is {a})"
            )
        if a == "fedavg":
            return
        if cfg.lora_rank <= 0 and cls.needs_lora:
            raise ConfigError(f"algorithm: {a} works on LoRA adapters; expected lora_rank >= 1 (got {cfg.lora_rank})")
        if (cfg.merging_strategy, cfg.merge_space) != ("average", "factors"):
            raise ConfigError(
                f"merging_strategy: algorithm {a} aggregates by its own rule; expected merging_strategy: "
                "average and merge_space: factors (merging strategies run with algorithm: fedavg)"
            )
        if cfg.shadow_strategies:
            raise ConfigError(
                f"shadow_strategies: shadows re-aggregate the updates of algorithm fedavg; expected [] "
                f"with algorithm {a}"
            )
        if cfg.dl_density < 1 or cfg.dl_density_decay < 1 or cfg.server_freeze or cfg.client_freeze:
            raise ConfigError(
                f"dl_density: algorithm {a} sends its clients what its method prescribes, dense; "
                "expected dl_density: 1, dl_density_decay: 1, server_freeze and client_freeze false"
            )
        if cls.sets_server and (cfg.server_opt, cfg.server_lr, cfg.server_schedule) != ("sgd", 1.0, "constant"):
            raise ConfigError(
                f"server_opt: algorithm {a} sets the server's model itself; expected server_opt: sgd, "
                "server_lr: 1 and server_schedule: constant"
            )
        if cfg.freeze_a and cls.learns_a:
            raise ConfigError(f"freeze_a: algorithm {a} learns A ({cls.learns_a}); expected freeze_a: false")
        if cfg.tiers > 1 and not cls.rank_tiers:
            rank_tiers = sorted(c.name for c in (FedAvg, *FedAvg.__subclasses__()) if c.rank_tiers)
            raise ConfigError(
                f"tiers: algorithm {a} trains one rank on every client; expected tiers: 1 (tiers run "
                f"with algorithm {', '.join(rank_tiers)})"
            )
        if cfg.tiers > 1 and cfg.syshet != "rank":
            raise ConfigError(f"syshet: algorithm {a} with tiers gives each tier a rank; expected syshet: rank")
        if cls.folds_base and (cfg.quantization != "none" or cfg.torch_dtype != "float32"):
            key, held = (
                ("quantization", f"bitsandbytes' {cfg.quantization} layers")
                if cfg.quantization != "none"
                else ("torch_dtype", f"a {cfg.torch_dtype} weight (8 or 11 bits of mantissa)")
            )
            raise ConfigError(
                f"{key}: algorithm {a} folds its server-side increments into the base weights W0, which "
                f"{held} cannot hold exactly; expected quantization: none and torch_dtype: float32"
            )
        if cls.fresh_adapters and cfg.init_lora_weights != "default":
            raise ConfigError(
                f"init_lora_weights: algorithm {a} gives every client a fresh adapter each round (A drawn as "
                "peft's default, B = 0); expected init_lora_weights: default"
            )
        if cls.needs_linear_lora:
            from flasc.models import resolve_name, spec_of

            if not spec_of(cfg).linear_lora:
                raise ConfigError(
                    f"algorithm: {a} works on products B·A of linear layers; model {resolve_name(cfg)} "
                    "adapts convolutions; expected another algorithm"
                )

    @classmethod
    def adapt_model(cls, cfg, model, task, clients, device, world) -> dict:
        """Before the run's trainable tensors are read: change the resident model the method trains
        (Fed-SB's fixed factors around a trained R); returns what `adapted` is then told."""
        return {}

    def adapted(self, setup: dict) -> None:
        """What adapt_model did (e.g. the bytes of the factors each client downloads once)."""

    def __init__(self, cfg, flat, pairs, aggregator, server_state):
        self.cfg, self.flat, self.pairs, self.aggregator = cfg, flat, pairs, aggregator
        self.server_state = server_state
        initial = server_state.params.detach()
        device = initial.device
        self.lora = (
            tiers_mod.lora_entries(flat, pairs, device)
            if pairs
            else torch.zeros(flat.numel, dtype=torch.bool, device=device)
        )
        self.base = BaseDelta(pairs) if self.folds_base else None
        self.held = np.zeros(cfg.clients, dtype=np.int64)  # base increments each client holds

    @property
    def current(self) -> torch.Tensor:
        """The server's trainable vector as it is now."""
        return self.server_state.params.detach()

    # -- plan (pure: a round abandoned before its server step leaves no trace)
    def prepare(self, rnd: int, job, state: torch.Tensor | None):
        """The client's job: where it starts, its plan and bytes down, its training extras."""
        if self.base is None:
            return job
        return replace(job, plan=replace(job.plan, dl_bytes=job.plan.dl_bytes + self.catch_up_bytes(job.client_id)))

    def catch_up_bytes(self, client: int) -> int:
        """Bytes of the base increments the client has missed (it holds them all once the round
        that downloads them is done: downloaded)."""
        return VALUE_BYTES * self.base.catch_up_values(int(self.held[client]))

    def downloaded(self, jobs) -> None:
        """After the round's server step, before after_step: every sampled client now holds the base
        increments made before this round."""
        if self.base is not None:
            for job in jobs:
                self.held[job.client_id] = len(self.base.increments)

    # -- after local training
    def finish(self, job, params: torch.Tensor, metrics: dict) -> tuple[torch.Tensor | None, dict, int]:
        """(the client's new state or None, what else it sends, the bytes of that)."""
        return None, {}, 0

    # -- reduce
    def aggregate(self, kept, jobs: dict, rnd: int, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.aggregator.aggregate(self.aggregator.updates(kept), start, rnd)

    def after_step(self, server_state, kept, jobs: dict, rnd: int) -> dict:
        return {}

    # -- evaluation
    def personal_model(self, client: int, state: torch.Tensor | None, download: torch.Tensor) -> torch.Tensor:
        """The model client `client` holds: its download of the global model plus its own state."""
        return download

    # -- helpers
    def client_factors(self, pair, job, result) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k, B_k) the server reconstructs from the client's start and its uploaded update."""
        a0, b0 = _named_factors(self.flat, pair, job.start)
        named = self.flat.named(result.update)
        return (a0 if pair.a is None else a0 - named[pair.a]), b0 - named[pair.b]

    def weights(self, kept) -> torch.Tensor:
        return merging.client_weights(sorted(kept, key=lambda r: r.client_id), self.cfg.weighting).to(self.lora.device)

    def state_dict(self) -> dict:
        return {"held": self.held.copy(), "base": None if self.base is None else self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.held = np.asarray(state["held"]).copy()
        if self.base is not None:
            self.base.load_state_dict(state["base"])


class TrainsPart:
    """For an algorithm (mixed in before FedAvg) whose clients train and send only part of the
    trainable vector each round, the flat mask its method `trained(rnd)` returns (e.g. one factor
    and the head): the rest stays exactly where every client holds it, also against the DP noise
    the release draws for it (nothing of it was sent). Its server optimizer must be stateless
    (check)."""

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.server_opt != "sgd":
            raise ConfigError(
                f"server_opt: algorithm {cls.name} keeps what a round does not train where every client "
                f"holds it, which a server optimizer with momentum or moments ({cfg.server_opt}) would move; "
                "expected server_opt: sgd"
            )

    def prepare(self, rnd, job, state):
        job = super().prepare(rnd, job, state)
        own = self.trained(rnd).to(job.start.device)
        plan = job.plan
        train = own if plan.train is None else plan.train.bool() & own
        restrict = own if plan.restrict is None else plan.restrict.bool() & own
        return replace(job, plan=replace(plan, train=train, restrict=restrict))

    def aggregate(self, kept, jobs, rnd, start):
        self.untrained_values = self.current[~self.trained(rnd)].clone()  # where every client holds it
        return super().aggregate(kept, jobs, rnd, start)

    def after_step(self, server_state, kept, jobs, rnd):
        """What the round did not train back where it was: the server step moved it only by the DP
        noise drawn for it (the pseudo-gradient of an entry nobody trained is zero)."""
        with torch.no_grad():
            server_state.params[~self.trained(rnd)] = self.untrained_values
        return super().after_step(server_state, kept, jobs, rnd)
