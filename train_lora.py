"""Federated LoRA with sparse communication (FLASC), simulated in one process.

    python train_lora.py --config flasc --server-rounds 20 --dl-density 0.1

Each round: sample clients -> download the server adapter, top-k masked at dl_density -> dense
local training -> upload update = (server ⊙ mask) − client, top-k at ul_density -> aggregate
(merging strategy) -> server optimizer step on the pseudo-gradient -> evaluate, log, save.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import algorithms
import checkpoint
import communication
import config as config_mod
import diagnostics
import shadows
import distributed
import merging
import models
import privacy
import seeding
import tiers as tiers_mod
import tracking
from client_state import ClientStateStore
from clients import ClientJob, ClientResult, ClientWorker
from interrupts import INTERRUPTS, Interrupted
from data import DataUnavailable, Task, load_task
from data import partition as partition_mod
from evaluation import evaluate
from server import ServerState
from shadows import Subset
from state import FlatParams, ResidentModel


class Diverged(RuntimeError):
    """Training went non-finite: the message names the round and what. The run stops (exit code
    EXIT_CODE) with its last good checkpoint and strict-JSON outputs up to the round before."""


EXIT_CODE, DIVERGED_FILE = tracking.EXIT_CODE, tracking.DIVERGED_FILE


# ---------------------------------------------------------------- setup
def pick_device(gpu: str, local_rank: int = 0) -> torch.device:
    """The device of this process; under torchrun, auto gives local rank r cuda:(r mod GPUs)."""
    if gpu == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if gpu == "auto":
            return torch.device("cpu")
        raise config_mod.ConfigError(f"gpu: CUDA device {gpu} was asked for but no CUDA device is "
                                     "visible; expected auto or cpu")
    if gpu == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if int(gpu) >= torch.cuda.device_count():
        raise config_mod.ConfigError(f"gpu: device {gpu} does not exist; expected an index below "
                                     f"{torch.cuda.device_count()}, auto or cpu")
    return torch.device("cuda", int(gpu))


def hold_out_local_tests(cfg, clients: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """eval_personalized: each client's data split into what it trains on and its own held-out test
    examples, round(local_test_fraction · n) of them in a seeded order (at least one of a client
    with two or more examples). Without it: the clients unchanged and no local tests."""
    if not cfg.eval_personalized:
        return clients, []
    train, test = [], []
    for c, idx in enumerate(clients):
        n_test = int(math.floor(cfg.local_test_fraction * len(idx) + 0.5))
        n_test = min(max(n_test, 1 if len(idx) >= 2 else 0), max(len(idx) - 1, 0))
        order = idx[torch.randperm(len(idx), generator=seeding.torch_generator(cfg.seed, "local_test", c))]
        test.append(order[:n_test].sort().values)
        train.append(order[n_test:].sort().values)
    return train, test


def make_clients(cfg, task: Task) -> list[torch.Tensor]:
    """Index tensors into task.train, one per client."""
    rng = seeding.numpy_rng(cfg.seed, "partition")
    partition = config_mod.resolved_partition(cfg)
    try:
        if partition == "natural":
            parts = partition_mod.natural(task.users, cfg.clients, cfg.min_client_size)
        elif partition == "iid":
            parts = partition_mod.iid(len(task.train), cfg.clients, rng, cfg.min_client_size)
        else:
            parts = partition_mod.dirichlet(task.train.labels.numpy(), cfg.clients, cfg.iid_alpha, rng,
                                            cfg.min_client_size)
    except ValueError as e:
        raise config_mod.ConfigError(str(e)) from None
    if cfg.iid_mix > 0:
        parts = partition_mod.iid_mix(parts, cfg.iid_mix, rng)
    return [torch.from_numpy(p) for p in parts]


# ---------------------------------------------------------------- one round
@dataclass
class Federation:
    """A run's parts on this process: the resident model, the data, the server state, the strategy,
    the client worker, and the world of ranks it belongs to (one without torchrun)."""
    cfg: config_mod.Config
    model: torch.nn.Module
    task: Task
    clients: list[torch.Tensor]
    device: torch.device
    world: distributed.World = field(default_factory=distributed.World)
    local_tests: list = field(default_factory=list)   # eval_personalized: each client's held-out examples
    resident: ResidentModel = field(init=False)
    server_state: ServerState = field(init=False)
    aggregator: merging.Aggregator = field(init=False)
    worker: ClientWorker = field(init=False)
    shadows: dict = field(init=False)             # shadow_strategies entry -> its Aggregator
    shadow_split: object = field(init=False)      # the validation examples shadows are scored on
    client_tier: list[int] = field(init=False)
    algorithm: algorithms.FedAvg = field(init=False)
    store: ClientStateStore | None = field(init=False, default=None)   # rank 0's client states (attach_store)
    on_client: object = field(init=False, default=None)   # (round, k, K) before the k-th client of K trains

    def __post_init__(self):
        self.resident = ResidentModel(self.model, self.device, self.cfg.bf16)
        self.server_state = ServerState(self.flat.read(), self.cfg)
        self.aggregator = merging.Aggregator(self.cfg, self.model, self.flat)
        self.shadows = shadows.shadow_aggregators(self.cfg, self.model, self.flat)
        needed = {a.statistic_key: (a.statistic, a.space.name == "product")
                  for a in [self.aggregator, *self.shadows.values()] if a.statistic is not None}
        self.algorithm = algorithms.ALGORITHMS[self.cfg.algorithm](self.cfg, self.flat, self.aggregator.pairs,
                                                                   self.aggregator, self.server_state)
        self.worker = ClientWorker(self.cfg, self.resident, self.task, self.clients, self.aggregator.pairs,
                                   needed, self.aggregator.statistic_key, self.algorithm)
        self.attach_store(None)   # a private temporary file until the run has its folder
        self.shadow_split = shadows.validation_subset(self.task.val, self.cfg.shadow_eval_examples, self.cfg.seed)
        self.client_tier = tiers_mod.assign(self.cfg).tolist()

    @property
    def flat(self) -> FlatParams:
        return self.resident.flat

    @property
    def server(self) -> torch.nn.Parameter:
        """The server's trainable vector."""
        return self.server_state.params

    @property
    def tier_masks(self) -> list:
        return self.server_state.tier_masks

    def attach_store(self, folder: Path | None, state: dict | None = None) -> None:
        """Open the client-state file in the run folder (None: an anonymous temporary file; rank 0
        of a stateful algorithm only) and restore a checkpoint's view of it."""
        if self.algorithm.state_numel and self.world.is_main:
            if self.store is not None:
                self.store.close()
            self.store = ClientStateStore(folder, self.cfg.clients, self.algorithm.state_numel)
            if state is not None:
                self.store.load_state_dict(state)

    def client_states(self, ids: list[int]) -> dict:
        """The stored states of these clients (None: never took part), on every rank (read by rank 0)."""
        if not self.algorithm.state_numel:
            return {}
        return self.world.from_main(lambda: {c: self.store.get(c) for c in ids})

    def sample_clients(self, rnd: int) -> list[int]:
        g = seeding.torch_generator(self.cfg.seed, "sampling", rnd)
        return sorted(torch.randperm(len(self.clients), generator=g)[: self.cfg.server_batch].tolist())

    def plan_round(self, rnd: int) -> tuple[list[ClientJob], list, list[torch.Tensor], float, float]:
        """The round's densities, the download of every tier (plans, starts), and who trains what
        from where (jobs, prepared by the algorithm)."""
        cfg = self.cfg
        dl_density = communication.density_at(cfg.dl_density, cfg.dl_density_decay, cfg.decay_freq, rnd)
        ul_density = communication.density_at(cfg.ul_density, cfg.ul_density_decay, cfg.decay_freq, rnd)
        plans = tiers_mod.plans(cfg, self.server_state, self.flat, self.aggregator.pairs, rnd, dl_density, ul_density)
        starts = [self.server_state.masked(p.download) for p in plans]
        jobs = [ClientJob(c, self.client_tier[c], starts[self.client_tier[c]], plans[self.client_tier[c]])
                for c in self.sample_clients(rnd)]
        states = self.client_states([j.client_id for j in jobs])
        jobs = [self.algorithm.prepare(rnd, j, states.get(j.client_id)) for j in jobs]
        return jobs, plans, starts, dl_density, ul_density

    def run_round(self, rnd: int) -> dict:
        """plan -> client work -> reduce -> server step; returns the round's metrics."""
        cfg = self.cfg
        # 1. plan: densities, the download of every tier, and who trains what
        jobs, plans, starts, dl_density, ul_density = self.plan_round(rnd)
        by_id = {j.client_id: j for j in jobs}

        # 2. client work: this rank's share of the clients, then every rank's results
        mine = [jobs[i] for i in self.world.my_share([len(self.clients[j.client_id]) for j in jobs])]
        results = self.world.gather(lambda: self.worker.train_group(rnd, mine, self.on_client), self.device)
        results.sort(key=lambda r: r.client_id)   # sums and merges in client order, whoever trained them
        kept = kept_results(results, cfg.diverged_clients, rnd)

        # 3. reduce: merge the updates by strategy (one shared start without tiers; with tiers only
        # factor-space strategies run, config.py), then the Gaussian mechanism on the sum of clipped updates
        updates = shadows.updates_for(self.aggregator, kept)
        drift = self.drift(updates, starts[0]) if cfg.drift_stats else {}
        pseudo_grad, merge_info = self.algorithm.aggregate(kept, by_id, rnd, starts[0])
        if cfg.noise_multiplier > 0 or cfg.dp_divide_by_clip:
            pseudo_grad = privacy.noisy_mean(pseudo_grad, len(updates), cfg.noise_multiplier, cfg.l2_clip_norm,
                                             seeding.torch_generator(cfg.seed, "noise", rnd), cfg.dp_divide_by_clip)
        if not torch.isfinite(pseudo_grad).all():
            raise Diverged(f"round {rnd + 1}: the aggregated update (pseudo-gradient) is not finite")

        # 4. server step (shadow strategies, when due, step copies of the state as it is now)
        server_lr = self.server_state.lr
        shadowed = bool(self.shadows) and (rnd + 1) % cfg.shadow_freq == 0
        before = self.server_state.copy() if shadowed else None
        self.server_state.step(pseudo_grad)
        merge_info = {**merge_info, **self.algorithm.after_step(self.server_state, kept, by_id, rnd)}
        if self.store is not None:
            for r in kept:
                if r.new_state is not None:
                    self.store.put(r.client_id, r.new_state)
        if not torch.isfinite(self.server).all():
            raise Diverged(f"round {rnd + 1}: the server parameters are not finite after the server step")
        self.world.check_same(self.server, f"the server after round {rnd + 1}")
        self.server_state.eval_mask = plans[0].download if cfg.tiers <= 1 else None
        self.server_state.tier_masks = [p.download for p in plans] if cfg.tiers > 1 else []
        shadow = (shadows.run_shadows(cfg, self.shadows, self.task.objective.primary, self.shadow_score, rnd, before,
                                      kept, starts[0], pseudo_grad) if shadowed else {})
        return {**round_metrics(results, kept, cfg.tiers, server_lr=server_lr, merge_info=merge_info,
                                dl_density=dl_density, ul_density=ul_density), **drift, **shadow}

    def shadow_score(self, params: torch.Tensor | None) -> float:
        """The validation primary metric, on the shadows' examples, of a server vector (None: the
        run's own), masked as the run's evaluation is."""
        params = self.server if params is None else params
        mask = self.server_state.eval_mask if self.cfg.eval_masked else None
        self.flat.write(params.detach() if mask is None else params.detach() * mask)
        return evaluate(self.model, self.shadow_split, self.task.objective, self.cfg.eval_batch, self.device,
                        self.cfg.bf16, self.world)[self.task.objective.primary]

    def drift(self, updates: list[merging.ClientUpdate], start: torch.Tensor) -> dict:
        """diagnostics.drift of the round's updates; the LoRA layers' weight updates are taken against
        the one shared download (left out with tiers, whose downloads differ, and for LoRA on convolutions)."""
        layers = {}
        if (self.aggregator.pairs and self.cfg.tiers <= 1 and self.algorithm.shared_start
                and models.MODELS[models.resolve_name(self.cfg)].linear_lora):
            blocks = merging.ProductSpace(self.flat, self.aggregator.pairs).blocks(updates, start)
            layers = {pair.name: blocks[pair.name] for pair in self.aggregator.pairs}
        return diagnostics.drift([u.delta for u in updates], [u.client_id for u in updates], layers)

    # -- checkpoints
    def state(self) -> dict:
        """What carries over between rounds: the server state, the algorithm's (SCAFFOLD's c, the
        base-weight delta, per-client facts) and which stored client states are current (the
        states themselves are in client_state.bin). Every random draw is seeded by its (seed,
        purpose, round, client), so no generator state is saved: a resumed run draws what an
        uninterrupted one draws."""
        return {**self.server_state.state_dict(), "algorithm": self.algorithm.state_dict(),
                "client_states": None if self.store is None else self.store.state_dict()}

    def load_state(self, state: dict) -> None:
        """Everything but the client states, which attach_store restores."""
        self.server_state.load_state_dict(state)
        if state.get("algorithm") is not None:
            self.algorithm.load_state_dict(state["algorithm"])

    # -- evaluation
    def load_eval_model(self) -> None:
        """Put the server model into the resident model: masked with the last download mask
        when eval_masked (what clients actually receive), else dense."""
        mask = self.server_state.eval_mask if self.cfg.eval_masked else None
        self.flat.write(self.server_state.masked(mask))

    def evaluate(self, splits=("val", "test")) -> dict:
        """Validation and test metrics of the server model; with tiers, also each tier's model
        (the server masked as that tier downloads it) on the test split; with eval_personalized,
        the personalised metrics (personalized_metrics)."""
        out = {}
        for i, mask in enumerate(self.tier_masks):
            self.flat.write(self.server_state.masked(mask))
            stats = self._evaluate_split("test")
            out.update({f"tier{i}_test_{k}": v for k, v in stats.items()})
        if self.local_tests:
            out.update(self.personalized_metrics())
        self.load_eval_model()
        for split in splits:
            out.update({f"{split}_{k}": v for k, v in self._evaluate_split(split).items()})
        return out

    def download_of(self, client: int) -> torch.Tensor:
        """The global model as this client downloads it (its tier's mask, or the evaluation mask)."""
        if self.tier_masks:
            return self.server_state.masked(self.tier_masks[self.client_tier[client]])
        return self.server_state.masked(self.server_state.eval_mask if self.cfg.eval_masked else None)

    def personalized_metrics(self) -> dict:
        """Each client's own model (its download plus its state: algorithms.personal_model) and the
        global model, both on the client's held-out examples: mean and spread over the clients
        that hold any (the primary metric; a client never sampled keeps its initial state)."""
        p = self.task.objective.primary
        own, glob = [], []
        ids = [c for c, idx in enumerate(self.local_tests) if len(idx)]
        if not ids:
            return {}
        global_model = self.server_state.masked(self.server_state.eval_mask if self.cfg.eval_masked else None)
        for chunk in range(0, len(ids), 32):   # states come from rank 0 a few at a time
            part = ids[chunk:chunk + 32]
            states = self.client_states(part)
            for c in part:
                split = Subset(self.task.train, self.local_tests[c])
                download = self.download_of(c)
                personal = self.algorithm.personal_model(c, states.get(c), download)
                self.flat.write(personal)
                own.append(self._evaluate_on(split)[p])
                if torch.equal(personal, global_model):
                    glob.append(own[-1])
                else:
                    self.flat.write(global_model)
                    glob.append(self._evaluate_on(split)[p])
        own_t, glob_t = torch.tensor(own, dtype=torch.float64), torch.tensor(glob, dtype=torch.float64)
        return {f"personal_{p}_mean": float(own_t.mean()), f"personal_{p}_std": float(own_t.std(unbiased=False)),
                f"personal_global_{p}_mean": float(glob_t.mean()),
                f"personal_global_{p}_std": float(glob_t.std(unbiased=False)), "personal_clients": len(own)}

    def _evaluate_on(self, split) -> dict:
        return evaluate(self.model, split, self.task.objective, self.cfg.eval_batch, self.device, self.cfg.bf16,
                        self.world)

    def _evaluate_split(self, split: str) -> dict:
        return evaluate(self.model, getattr(self.task, split), self.task.objective, self.cfg.eval_batch,
                        self.device, self.cfg.bf16, self.world)


def kept_results(results: list[ClientResult], policy: str, rnd: int) -> list[ClientResult]:
    """The results whose update the server receives. A diverged client (non-finite loss or update)
    stops the run (diverged_clients: stop; the lowest client id is named) or is left out (skip)."""
    diverged = [r for r in results if r.diverged]
    if diverged and policy == "stop":
        raise Diverged(f"round {rnd + 1}: client {diverged[0].client_id}'s local {diverged[0].diverged} is not finite")
    kept = [r for r in results if not r.diverged]
    if not kept:
        raise Diverged(f"round {rnd + 1}: the local training of every sampled client diverged")
    return kept


def round_metrics(results: list[ClientResult], kept: list[ClientResult], tiers: int, server_lr: float,
                  merge_info: dict, dl_density: float, ul_density: float) -> dict:
    """The round's line of metrics.jsonl (before evaluation): training metrics over the clients whose
    update was kept, bytes over every client (a diverged client's download happened)."""
    total = lambda key: sum(r.metrics[key] for r in kept)  # noqa: E731
    count = max(total("count"), 1)
    down = [sum(r.bytes_down for r in results if r.tier == i) for i in range(max(tiers, 1))]
    up = [sum(r.bytes_up for r in results if r.tier == i) for i in range(max(tiers, 1))]
    per_tier = {}
    if tiers > 1:
        for i in range(tiers):
            per_tier.update({f"bytes_up_tier{i}": up[i], f"bytes_down_tier{i}": down[i]})
    return {
        "train_loss": total("loss_sum") / count,
        "train_accuracy": total("correct") / count,
        "local_epochs": total("epochs") / len(kept),
        "server_lr": server_lr,
        "stats_seconds": sum(r.stats_seconds for r in results),
        **merge_info,
        "update_norm": total("norm") / len(kept),
        "clipped_fraction": sum(int(r.metrics["clipped"]) for r in kept) / len(kept),
        "diverged_clients": len(results) - len(kept),
        "dl_density": dl_density,
        "ul_density": ul_density,
        "bytes_down": sum(down),
        "bytes_up": sum(up),
        **per_tier,
    }


# ---------------------------------------------------------------- the run
def build(cfg, device: torch.device, world: distributed.World | None = None) -> Federation:
    """Data, model and server state; raises DataUnavailable / ModelUnavailable / ConfigError.

    clients: 0 (every user of a natural partition) is resolved here to the number of users, and
    the run records the resolved config."""
    tokenizer = functools.cache(lambda: models.load_tokenizer(cfg))
    task = load_task(cfg.dataset, cfg.data_dir, tokenizer, cfg.max_length, cfg.augment)
    clients, local_tests = hold_out_local_tests(cfg, make_clients(cfg, task))
    if cfg.clients != len(clients):
        cfg = config_mod.from_mapping({**cfg, "clients": len(clients)})
    tok = tokenizer()[0]  # None for image models
    pad_id = None if tok is None else tok.pad_token_id
    model = models.build_model(cfg, task.num_labels, pad_id, task.objective.lm_head).to(device)
    if cfg.lora_rank == -1:  # "every parameter" means every parameter the loss can reach
        # a validation batch: its transform draws no augmentation from the global generator
        models.freeze_unreached(model, task.val.batch(torch.arange(min(2, len(task.val)))), device)
    return Federation(cfg, model, task, clients, device, world or distributed.World(), local_tests)


@dataclass
class Progress:
    """What the run carries from round to round besides the server; saved in every checkpoint."""
    rounds_done: int = 0
    totals: dict = field(default_factory=dict)    # cumulative bytes_* counters
    evals: list = field(default_factory=list)     # the records of evaluated rounds
    wall_time_s: float = 0.0                      # before the current process started


def round_record(fed: Federation, rnd: int, progress: Progress) -> dict:
    """Run round `rnd` (and its evaluation when due); the metrics.jsonl line."""
    cfg = fed.cfg
    t0 = time.perf_counter()
    record = {"round": rnd + 1, **fed.run_round(rnd)}
    record["train_seconds"] = time.perf_counter() - t0
    evaluated = (rnd + 1) % cfg.eval_freq == 0 or rnd + 1 == cfg.server_rounds
    if evaluated:
        t_eval = time.perf_counter()
        record.update(fed.evaluate())
        record["eval_seconds"] = time.perf_counter() - t_eval
    non_finite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if non_finite:  # checked before anything of this round is kept
        raise Diverged(f"round {rnd + 1}: {non_finite[0]} is {record[non_finite[0]]}")
    for key in [k for k in record if k.startswith("bytes_")]:
        progress.totals[key] = progress.totals.get(key, 0) + record[key]
        record[key + "_total"] = progress.totals[key]
    if cfg.noise_multiplier > 0:
        record["epsilon"] = finite_or_none(privacy.epsilon(cfg.noise_multiplier, cfg.server_batch / cfg.clients,
                                                           rnd + 1, privacy.resolved_delta(cfg)))
    if evaluated:
        progress.evals.append(record)
    record["seconds"] = time.perf_counter() - t0
    progress.totals["elapsed_seconds"] = progress.totals.get("elapsed_seconds", 0.0) + record["seconds"]
    record["elapsed_seconds"] = progress.totals["elapsed_seconds"]   # training and evaluation so far
    return record


def finite_or_none(value: float) -> float | None:
    """Strict JSON has no Infinity: an unbounded epsilon is written as null."""
    return value if math.isfinite(value) else None


def describe_setup(fed: Federation, run, logger) -> dict:
    """Log the config, model and partition; save partition.json; the run facts for summary.json."""
    cfg = fed.cfg
    logger.debug(f"config:\n{config_mod.dump(cfg)}")  # train.log and config.yaml; the screen gets a header
    info = {**models.describe(fed.model), "device": str(fed.device), "model": models.resolve_name(cfg),
            "train_examples": len(fed.task.train)}
    adapters = {-1: "full fine-tuning", 0: "head only"}.get(cfg.lora_rank, f"LoRA rank {cfg.lora_rank}")
    threads = torch.get_num_threads()
    threads = (f", {threads} thread{'s' if threads != 1 else ''}" if fed.device.type == "cpu" else "") + fed.world.describe()
    logger.info(f"run     {run.dir}  (full config: config.yaml, log: train.log)\n"
                f"model   {info['model']}, {adapters}: {info['trainable_params']:,} trainable of "
                f"{info['total_params']:,} parameters, on {fed.device}{threads}{', bf16' if cfg.bf16 else ''}\n"
                f"data    {cfg.dataset}: {info['train_examples']} training examples, {cfg.clients} clients "
                f"({config_mod.resolved_partition(cfg)}), {cfg.server_batch} a round\n"
                f"rounds  {cfg.server_rounds}: server {cfg.server_opt} lr {cfg.server_lr:g}, {cfg.merging_strategy} "
                f"in {cfg.merge_space} space, density down {cfg.dl_density:g} / up {cfg.ul_density:g}")
    labels = getattr(fed.task.train, "labels", None)
    report = partition_mod.report([c.numpy() for c in fed.clients], None if labels is None else labels.numpy(),
                                  fed.task.label_names)
    tracking.write_json_atomic(run.dir / "partition.json", report)
    part = report["summary"]
    logger.info(f"partition: {part['examples']} training examples over {part['clients']} clients, "
                f"{part['min_examples']}..{part['max_examples']} each (median {part['median_examples']:g}, "
                f"{part['empty_clients']} empty)" + (f"; mean label TV distance from the whole "
                f"{part['mean_label_tv_distance']:.3f}" if "mean_label_tv_distance" in part else ""))
    return info


def summarize(fed: Federation, progress: Progress, wall_time_s: float) -> dict:
    """The final metrics (all of the objective's), and the primary metric's best values."""
    cfg, evals, totals = fed.cfg, progress.evals, progress.totals
    p = fed.task.objective.primary
    final, best = evals[-1], max(evals, key=lambda r: r[f"val_{p}"])
    up_total, down_total = totals.get("bytes_up", 0), totals.get("bytes_down", 0)
    summary = {
        "primary_metric": p,
        **{k: v for k, v in final.items() if k.startswith(("test_", "val_", "personal_"))},
        f"best_test_{p}": max(r[f"test_{p}"] for r in evals),
        f"best_val_{p}": best[f"val_{p}"],
        f"test_{p}_at_best_val": best[f"test_{p}"],
        "bytes_up": up_total,
        "bytes_down": down_total,
        "bytes_total": up_total + down_total,
        "rounds": cfg.server_rounds,
        "wall_time_s": wall_time_s,
        **{k: v for k, v in final.items() if k.startswith("tier")},
        **{k: v for k, v in totals.items() if "_tier" in k},
        **models.describe(fed.model), "device": str(fed.device), "model": models.resolve_name(cfg),
        "train_examples": len(fed.task.train),
        **diagnostics.convergence(evals, p, cfg.target_accuracy),
    }
    if cfg.noise_multiplier > 0:
        dp_delta = privacy.resolved_delta(cfg)
        summary.update(epsilon=finite_or_none(privacy.epsilon(cfg.noise_multiplier, cfg.server_batch / cfg.clients,
                                                              cfg.server_rounds, dp_delta)),
                       dp_delta=dp_delta, noise_multiplier=cfg.noise_multiplier, l2_clip_norm=cfg.l2_clip_norm)
    return summary


def train(cfg, console=None, resume_dir: Path | None = None, config_name: str | None = None,
          world: distributed.World | None = None) -> Path:
    """Run the whole federated training (or continue it from resume_dir); returns the run folder
    (on ranks other than 0, which write nothing, the folder rank 0 would write first).
    config_name: the --config it came from, recorded in config.yaml for tables and plots.
    world: the ranks of a torchrun launch (distributed.start); None: this process alone."""
    with seeding.deterministic_algorithms(cfg.deterministic):
        try:
            return _train(cfg, console, resume_dir, config_name, world or distributed.World())
        except RuntimeError as e:
            if cfg.deterministic and "does not have a deterministic implementation" in str(e):
                op = str(e).split()[0]
                raise config_mod.ConfigError(f"deterministic: true, but {op} has no deterministic implementation "
                                             "on this device; expected deterministic: false for this model") from None
            raise


def _train(cfg, console, resume_dir: Path | None, config_name: str | None, world: distributed.World) -> Path:
    from loguru import logger
    from tqdm import tqdm

    started = time.time()
    device = pick_device(cfg.gpu, world.local_rank)
    tracking.check_writable(cfg.dir if resume_dir is None else str(resume_dir))
    writes = world.is_main   # rank 0 alone writes the run folder
    lock = tracking.lock_run_dir(resume_dir, "--resume") if resume_dir is not None and writes else None
    try:
        fed = build(cfg, device, world)  # everything that can fail on bad input fails before the run folder exists
        cfg = fed.cfg
        progress = Progress()
        if resume_dir is None:
            run = (tracking.RunLog(cfg, console, config_name=config_name) if writes
                   else tracking.NoRunLog(Path(cfg.dir) / cfg.name))
            fed.attach_store(run.dir)
        else:
            state = checkpoint.load(resume_dir, cfg, fed.flat.numel)
            fed.load_state(state["federation"])
            progress = Progress(**state["progress"])
            run = (tracking.RunLog(cfg, console, existing=resume_dir, metrics_offset=state["metrics_offset"],
                                   purge_step=progress.rounds_done + 1, lock=lock) if writes
                   else tracking.NoRunLog(resume_dir))
            fed.attach_store(run.dir, state["federation"].get("client_states"))
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    elapsed = lambda: progress.wall_time_s + time.time() - started  # noqa: E731

    saved = {"round": progress.rounds_done if resume_dir is not None else None}

    def save_checkpoint():
        if not writes:
            saved["round"] = progress.rounds_done
            return
        if fed.store is not None:
            fed.store.flush()   # the states the checkpoint refers to are on disk before it is
        checkpoint.save(run.dir, {
            "round": progress.rounds_done, "config_fingerprint": checkpoint.config_fingerprint(cfg),
            "federation": fed.state(), "metrics_offset": run.metrics_offset(),
            "progress": {**vars(progress), "wall_time_s": elapsed()}})
        if fed.store is not None:
            fed.store.committed()
        saved["round"] = progress.rounds_done

    bar = None
    try:
        if resume_dir is None and writes:
            describe_setup(fed, run, logger)
        elif writes:
            (run.dir / DIVERGED_FILE).unlink(missing_ok=True)  # the run is live again
            logger.info(f"resumed {run.dir} after round {progress.rounds_done} of {cfg.server_rounds}")
        if cfg.server_rounds == 0 and not progress.evals:  # evaluate (and save) the initial model
            record = {"round": 0, **fed.evaluate(), "bytes_up_total": 0, "bytes_down_total": 0, "seconds": 0.0,
                      "elapsed_seconds": 0.0}
            run.log_round(record)
            progress.evals.append(record)
        bar = tqdm(range(progress.rounds_done, cfg.server_rounds), desc="rounds", disable=console is None,
                   file=sys.stderr, initial=progress.rounds_done, total=cfg.server_rounds)
        last = {"text": ""}   # the previous round's loss and accuracy, kept on the bar while clients train
        whose = "rank 0's " if world.size > 1 else ""   # the bar shows rank 0's share of the clients
        fed.on_client = lambda rnd, k, n: bar.set_postfix_str(  # noqa: E731
            f"{last['text']}{', ' if last['text'] else ''}round {rnd + 1}: {whose}client {k}/{n}", refresh=True)
        for rnd in bar:
            with INTERRUPTS.deferred():  # from the server step to the checkpoint, a round is all or nothing
                record = round_record(fed, rnd, progress)
                run.log_round(record)
                progress.rounds_done = rnd + 1
                checkpoint.crash_point("after_log", rnd + 1)
                if cfg.ckpt_freq and (rnd + 1) % cfg.ckpt_freq == 0 and rnd + 1 < cfg.server_rounds:
                    save_checkpoint()
            evals, p = progress.evals, fed.task.objective.primary
            last["text"] = (f"loss={record['train_loss']:.3f}, acc={record['train_accuracy']:.3f}, "
                            f"test={evals[-1][f'test_{p}']:.3f}" if evals else
                            f"loss={record['train_loss']:.3f}, acc={record['train_accuracy']:.3f}")
            bar.set_postfix_str(last["text"])
            if f"test_{p}" in record:
                eps = (f", epsilon {record['epsilon']:.3f}" if record.get("epsilon") is not None
                       else ", epsilon unbounded" if "epsilon" in record else "")
                logger.info(f"round {rnd + 1}: train loss {record['train_loss']:.4f}, "
                            f"val {p} {record[f'val_{p}']:.4f}, test {p} {record[f'test_{p}']:.4f}, "
                            f"MB up/down {progress.totals['bytes_up'] / 1e6:.2f}/"
                            f"{progress.totals['bytes_down'] / 1e6:.2f}{eps}")
        with INTERRUPTS.deferred():
            save_checkpoint()  # the end state: a crash while saving below resumes straight to saving
            fed.load_eval_model()  # the saved adapter is exactly the model evaluated last
            if writes:
                models.save_trained(fed.model, run.dir / "adapter")
                if fed.algorithm.base is not None:   # the base-weight delta: the saved model is the evaluated one
                    fed.algorithm.base.save(run.dir / "adapter")
            summary = summarize(fed, progress, elapsed())
            run.write_summary(summary)
        logger.info(f"done: test {summary['primary_metric']} {summary[f'test_' + summary['primary_metric']]:.4f}, "
                    f"{summary['bytes_total'] / 1e6:.2f} MB communicated, "
                    f"{summary['wall_time_s']:.0f} s; results in {run.dir}")
        return run.dir
    except Interrupted as e:
        INTERRUPTS.depth += 1  # further signals wait: the process is ending, let it save
        if bar is not None:
            bar.close()
        if progress.rounds_done and saved["round"] != progress.rounds_done:
            save_checkpoint()  # the last completed round, so that nothing done is lost
        e.message = (f"interrupted ({e}) after round {saved['round']} of {cfg.server_rounds}; resume with: "
                     f"python train_lora.py --resume {run.dir}" if saved["round"] is not None else
                     f"interrupted ({e}) before the first round ended; nothing to resume: start {run.dir.name} again")
        logger.warning(e.message)
        raise
    except Diverged as e:
        kept = (f"{run.dir} keeps the checkpoint of round {saved['round']} "
                f"(python train_lora.py --resume {run.dir} continues from it)" if saved["round"] is not None
                else f"no checkpoint was written before it; start {run.dir.name} again with other settings")
        logger.error(f"{e}: the run stops; {kept}")
        if writes:
            tracking.write_json_atomic(run.dir / DIVERGED_FILE, {"reason": str(e), "checkpoint_round": saved["round"]})
        raise Diverged(f"{e}; {kept}") from None
    finally:
        run.close()
        if fed.store is not None:
            fed.store.close()


USAGE = """usage: python train_lora.py [--config NAME] [--option-name value ...]
       python train_lora.py --resume RUN_DIR
       python train_lora.py --list-configs

Options and their defaults are documented in configs/basic_config.yaml;
--config NAME overlays configs/NAME.yaml; command-line options override both."""


def parse_resume(argv: list[str]) -> tuple[config_mod.Config, Path] | None:
    """--resume RUN_DIR: the run's saved config and its folder."""
    if "--resume" not in argv and not any(a.startswith("--resume=") for a in argv):
        return None
    args = [a for a in argv if a != "--resume"]
    folder = args[0].split("=", 1)[1] if args and args[0].startswith("--resume=") else (args[0] if args else None)
    if folder is None or len(args) != 1:
        raise config_mod.ConfigError("--resume RUN_DIR continues a run with its saved config; "
                                     "it takes the folder and no other option")
    run_dir = Path(folder)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise config_mod.ConfigError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
    try:
        values = config_mod.yaml_load(saved.read_text())
    except yaml.YAMLError:
        raise config_mod.ConfigError(f"--resume: {saved} is not valid YAML") from None
    if not isinstance(values, dict):
        raise config_mod.ConfigError(f"--resume: {saved} is not a config")
    return config_mod.from_mapping(values), run_dir


def parse_cli(argv: list[str]) -> config_mod.Config | None:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return None
    if "--list-configs" in argv:
        names = config_mod.list_configs()
        width = max(map(len, names))
        print("\n".join(f"{n:{width}s}  {config_mod.describe_config(n)}" for n in names))
        return None
    name, rest = config_mod.split_config_arg(argv)
    return config_mod.load_config(name, config_mod.parse_overrides(rest))


def main(argv: list[str] | None = None) -> int:
    """The command line; under torchrun every rank runs it (rank 0 alone prints and writes)."""
    from dotenv import load_dotenv
    from loguru import logger

    load_dotenv()  # a local .env may set CUDA_VISIBLE_DEVICES, HF_HOME, HF_HUB_OFFLINE...
    logger.remove()
    argv = sys.argv[1:] if argv is None else argv
    speaks = distributed.launched_ranks()[0] == 0   # the same error on every rank is printed once
    say = lambda text: print(text, file=sys.stderr) if speaks else None  # noqa: E731
    world = distributed.World()
    INTERRUPTS.install()
    try:
        resume = parse_resume(argv)
        if resume is not None:
            cfg, run_dir = resume
            if (run_dir / "summary.json").is_file():
                if speaks:
                    print(f"{run_dir} is finished already (summary.json); nothing to resume")
                return 0
            world = start_world(cfg)
            train(cfg, console=tracking.console_sink if speaks else None, resume_dir=run_dir, world=world)
            return 0
        cfg = parse_cli(argv)
        if cfg is None:
            return 0
        world = start_world(cfg)
        train(cfg, console=tracking.console_sink if speaks else None,
              config_name=config_mod.split_config_arg(argv)[0], world=world)
    except (config_mod.ConfigError, DataUnavailable, models.ModelUnavailable, checkpoint.CheckpointError) as e:
        say(f"error: {e}")
        return EXIT_CODE["bad_input"]
    except Diverged as e:
        say(f"error: {e}")
        return EXIT_CODE["diverged"]
    except distributed.RankFailed as e:
        say(f"error: {e}")
        return EXIT_CODE["failed"]
    except distributed.RankLost as e:   # rank 0 may be the one that died: every rank says it
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CODE["failed"]
    except Interrupted as e:
        say(getattr(e, "message", f"interrupted ({e}) before the run started; nothing was written"))
        return e.exit_code
    finally:
        INTERRUPTS.uninstall()
        world.close()
    return 0


def start_world(cfg) -> distributed.World:
    """Join the torchrun launch this process is part of (world size 1 without one)."""
    local_rank = distributed.launched_ranks()[2]
    return distributed.start(pick_device(cfg.gpu, local_rank), cfg.dist_timeout, gpu_per_rank=cfg.gpu == "auto")


if __name__ == "__main__":
    sys.exit(main())
