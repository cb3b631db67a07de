"""Federated LoRA with sparse communication (FLASC), simulated in one process.

    python train_lora.py --config flasc --server-rounds 20 --dl-density 0.1

Each round: sample clients -> download the server adapter, top-k masked at dl_density -> dense
local training -> upload update = (server ⊙ mask) − client, top-k at ul_density -> aggregate
(merging strategy) -> server optimizer step on the pseudo-gradient -> evaluate, log, save.
docs/round.md says exactly what each step does; this file is the round and the run around it.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before torch is imported: a typo is refused at once, a rank ends with torchrun
    import os

    import config
    from flasc.runtime.interrupts import end_with_parent

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        end_with_parent()  # armed before the seconds of imports in which torchrun could die unnoticed
    config.refuse_bad_options(sys.argv[1:])

import functools
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import config as config_mod
import merging
from data import DATASETS, DataUnavailable, Task, load_task_for, resolved_partition
from data import partition as partition_mod
from flasc import algorithms, models
from flasc.client.state_store import ClientStateStore
from flasc.client.worker import ClientJob, ClientWorker
from flasc.diagnostics import convergence
from flasc.diagnostics.drift import Drift
from flasc.diagnostics.shadows import Shadows, shadow_aggregators, validation_subset
from flasc.federation import communication, privacy
from flasc.federation import tiers as tiers_mod
from flasc.federation.population import hold_out_local_tests, make_clients
from flasc.federation.scores import Evaluation, PersonalScores, ServerScores
from flasc.federation.server import ServerState
from flasc.models.params import FlatParams, ResidentModel
from flasc.round import Diverged, Reduced, RoundCallback, RoundPlan, kept_results, round_metrics
from flasc.runtime import checkpoint, distributed, files, seeding, tracking
from flasc.runtime.distributed import pick_device
from flasc.runtime.interrupts import INTERRUPTS, Interrupted, end_with_parent
from flasc.tasks import llm_eval

EXIT_CODE, DIVERGED_FILE = tracking.EXIT_CODE, tracking.DIVERGED_FILE
__all__ = ["Federation", "Diverged", "build", "train", "main", "pick_device", "make_clients", "hold_out_local_tests"]


# ---------------------------------------------------------------- the round
@dataclass
class Federation:
    """A run's round on this process: the resident model, the data, the server state, the
    aggregator, the algorithm, the client worker, the world of ranks it belongs to (one without
    torchrun), and the parts that hang off the round (callbacks: drift, shadows)."""

    cfg: config_mod.Config
    model: torch.nn.Module
    task: Task
    clients: list[torch.Tensor]
    device: torch.device
    world: distributed.World = field(default_factory=distributed.World)
    local_tests: list = field(default_factory=list)  # eval_personalized: each client's held-out examples
    callbacks: list[RoundCallback] = field(default_factory=list)
    resident: ResidentModel = field(init=False)
    server_state: ServerState = field(init=False)
    aggregator: merging.Aggregator = field(init=False)
    algorithm: algorithms.FedAvg = field(init=False)
    worker: ClientWorker = field(init=False)
    client_tier: list[int] = field(init=False)
    store: ClientStateStore | None = field(init=False, default=None)  # rank 0's client states (attach_store)
    statistics: dict = field(init=False)  # what clients compute for the strategies: key -> (statistic, product space)
    evaluation: Evaluation | None = field(init=False, default=None)  # the run's evaluation (build)
    on_client: object = field(init=False, default=None)  # (round, k, K) before the k-th client of K trains

    def __post_init__(self):
        cfg = self.cfg
        algorithm = algorithms.ALGORITHMS[cfg.algorithm]
        # before the trainable tensors are read: an algorithm may change what trains (Fed-SB's R)
        setup = algorithm.adapt_model(cfg, self.model, self.task, self.clients, self.device, self.world)
        self.resident = ResidentModel(self.model, self.device, cfg.bf16)
        self.server_state = ServerState(self.flat.read(), cfg)
        self.aggregator = merging.Aggregator(cfg, self.model, self.flat)
        self.algorithm = algorithm(cfg, self.flat, self.aggregator.pairs, self.aggregator, self.server_state)
        self.algorithm.adapted(setup)
        self.statistics = {
            self.aggregator.statistic_key: (self.aggregator.statistic, self.aggregator.space.name == "product")
        }
        self.statistics = {k: v for k, v in self.statistics.items() if k is not None}
        self.worker = ClientWorker(
            cfg,
            self.resident,
            self.task,
            self.clients,
            self.aggregator.pairs,
            self.statistics,
            self.aggregator.statistic_key,
            self.algorithm,
        )
        self.client_tier = tiers_mod.assign(cfg).tolist()
        self.attach_store(None)  # a private temporary file until the run has its folder

    def needs_statistics(self, aggregators) -> None:
        """Clients also compute the statistics these (shadow) aggregators merge with."""
        for a in aggregators:
            if a.statistic is not None:
                self.statistics[a.statistic_key] = (a.statistic, a.space.name == "product")

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

    # -- client states (stateful algorithms)
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

    def states_of_shares(self, shares: list[list[int]]) -> dict:
        """Each rank's own clients' stored states: rank 0 reads them and sends rank r those of shares[r]."""
        if not self.algorithm.state_numel:
            return {}
        return self.world.scatter_from_main(lambda: [{c: self.store.get(c) for c in share} for share in shares])

    # -- 1. plan
    def sample_clients(self, rnd: int) -> list[int]:
        g = seeding.torch_generator(self.cfg.seed, "sampling", rnd)
        return sorted(torch.randperm(len(self.clients), generator=g)[: self.cfg.server_batch].tolist())

    def shares(self, jobs: list[ClientJob]) -> list[list[int]]:
        """The clients each rank trains (balanced by size; the same on every rank)."""
        sizes = [len(self.clients[j.client_id]) for j in jobs]
        return [[jobs[i].client_id for i in share] for share in distributed.balanced_shares(sizes, self.world.size)]

    def plan_round(self, rnd: int) -> RoundPlan:
        """The round's densities, every tier's download, and who trains what from where (the jobs,
        prepared by the algorithm). Pure: nothing is changed until the server step."""
        cfg = self.cfg
        dl_density = communication.density_at(cfg.dl_density, cfg.dl_density_decay, cfg.decay_freq, rnd)
        ul_density = communication.density_at(cfg.ul_density, cfg.ul_density_decay, cfg.decay_freq, rnd)
        plans = tiers_mod.plans(cfg, self.server_state, self.flat, self.aggregator.pairs, rnd, dl_density, ul_density)
        starts = [self.server_state.masked(p.download) for p in plans]
        jobs = [
            ClientJob(c, self.client_tier[c], starts[self.client_tier[c]], plans[self.client_tier[c]])
            for c in self.sample_clients(rnd)
        ]
        # a client's state goes only to the rank that trains it; other ranks plan that job without it
        shares = self.shares(jobs)
        states = self.states_of_shares(shares)
        jobs = [self.algorithm.prepare(rnd, j, states.get(j.client_id)) for j in jobs]
        return RoundPlan(rnd, dl_density, ul_density, plans, starts, jobs, shares)

    # -- 2. client work
    def client_work(self, plan: RoundPlan) -> list:
        """This rank's share of the clients trained, then every rank's results, in client order."""
        mine = set(plan.shares[self.world.rank])
        own = [j for j in plan.jobs if j.client_id in mine]
        results = self.world.gather(lambda: self.worker.train_group(plan.rnd, own, self.on_client), self.device)
        return sorted(results, key=lambda r: r.client_id)  # sums and merges in client order, whoever trained them

    # -- 3. reduce
    def reduce(self, plan: RoundPlan, results: list) -> Reduced:
        """The kept updates merged by the algorithm (and strategy), then the Gaussian mechanism."""
        rnd = plan.rnd
        kept = kept_results(results, self.cfg.diverged_clients, rnd)
        updates = self.aggregator.updates(kept)
        pseudo_grad, merge_info = self.algorithm.aggregate(kept, plan.by_id, rnd, plan.starts[0])
        pseudo_grad = privacy.release(pseudo_grad, len(updates), self.cfg, rnd)
        if not torch.isfinite(pseudo_grad).all():
            raise Diverged(f"round {rnd + 1}: the aggregated update (pseudo-gradient) is not finite")
        return Reduced(plan, results, kept, updates, pseudo_grad, merge_info)

    # -- 4. server step
    def server_step(self, reduced: Reduced) -> dict:
        """The server optimizer's step, what the algorithm does after it, the clients' new states,
        the round's download masks kept; returns the algorithm's metrics."""
        rnd, plan = reduced.plan.rnd, reduced.plan
        self.server_state.step(reduced.pseudo_grad)
        self.algorithm.downloaded(plan.jobs)
        info = self.algorithm.after_step(self.server_state, reduced.kept, plan.by_id, rnd)
        if self.store is not None:
            for r in reduced.kept:
                if r.new_state is not None:
                    self.store.put(r.client_id, r.new_state)
        if not torch.isfinite(self.server).all():
            raise Diverged(f"round {rnd + 1}: the server parameters are not finite after the server step")
        self.world.check_same(self.server, f"the server after round {rnd + 1}")
        self.server_state.keep_downloads(rnd, plan.plans)
        return info

    def run_round(self, rnd: int) -> dict:
        """plan -> client work -> reduce -> server step; returns the round's metrics."""
        plan = self.plan_round(rnd)
        reduced = self.reduce(plan, self.client_work(plan))
        server_lr = self.server_state.lr
        before = [cb.before_step(rnd, reduced, self.server_state) for cb in self.callbacks]
        reduced.merge_info.update(self.server_step(reduced))
        after = [cb.after_step(rnd, reduced, self.server_state) for cb in self.callbacks]
        out = round_metrics(reduced, self.cfg.tiers, server_lr)
        for metrics in [*before, *after]:
            out.update(metrics)
        return out

    # -- checkpoints
    def state(self) -> dict:
        """What carries over between rounds: the server state, the algorithm's (SCAFFOLD's c, the
        base-weight delta, per-client facts) and which stored client states are current (the
        states themselves are in client_state.bin). Every random draw is seeded by its (seed,
        purpose, round, client), so no generator state is saved: a resumed run draws what an
        uninterrupted one draws."""
        return {
            **self.server_state.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "client_states": None if self.store is None else self.store.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        """Everything but the client states, which attach_store restores."""
        self.server_state.load_state_dict(state)
        if state.get("algorithm") is not None:
            self.algorithm.load_state_dict(state["algorithm"])


# ---------------------------------------------------------------- building a run
def build(cfg, device: torch.device, world: distributed.World | None = None) -> Federation:
    """Data, model, server state and the round's parts; raises DataUnavailable / ModelUnavailable /
    ConfigError. clients: 0 (every user of a natural partition) is resolved here to the number of
    users, and the run records the resolved config."""
    world = world or distributed.World()
    tokenizer = functools.cache(lambda: models.load_tokenizer(cfg))
    task = load_task_for(cfg, tokenizer)
    clients, tests = hold_out_local_tests(cfg, make_clients(cfg, task))
    if cfg.clients != len(clients):
        cfg = config_mod.from_mapping({**cfg, "clients": len(clients)})
    tok = tokenizer()[0]  # None for image models
    pad_id = None if tok is None else tok.pad_token_id
    model = models.build_model(cfg, task.num_labels, pad_id, task.objective.lm_head).to(device)
    if cfg.lora_rank == -1:  # "every parameter" means every parameter the loss can reach
        # a validation batch: its transform draws no augmentation from the global generator
        models.freeze_unreached(model, task.val.batch(torch.arange(min(2, len(task.val)))), device)
    fed = Federation(cfg, model, task, clients, device, world, tests)
    scores = ServerScores(fed.resident, task, world, cfg.eval_batch, cfg.eval_masked)
    fed.evaluation = Evaluation(
        scores,
        PersonalScores(scores, tests, fed.client_tier, fed.algorithm, fed.client_states) if tests else None,
        llm_eval.RunScores(cfg, tok, world) if cfg.llm_tasks else None,
    )
    if cfg.drift_stats:
        linear = models.spec_of(cfg).linear_lora
        fed.callbacks.append(
            Drift(fed.flat, fed.aggregator.pairs, cfg.tiers <= 1 and fed.algorithm.shared_start and linear)
        )
    if cfg.shadow_strategies:
        aggregators = shadow_aggregators(cfg, model, fed.flat)
        fed.needs_statistics(aggregators.values())
        split = validation_subset(task.val, cfg.shadow_eval_examples, cfg.seed)
        fed.callbacks.append(Shadows(cfg, aggregators, scores, split))
    return fed


@dataclass
class Progress:
    """What the run carries from round to round besides the server; saved in every checkpoint."""

    rounds_done: int = 0
    totals: dict = field(default_factory=dict)  # cumulative bytes_* counters
    evals: list = field(default_factory=list)  # the records of evaluated rounds
    wall_time_s: float = 0.0  # before the current process started
    eval_keys: list = field(default_factory=list)  # what an evaluation adds to a round's record


def round_record(fed: Federation, rnd: int, progress: Progress) -> dict:
    """Run round `rnd` (and its evaluation when due); the metrics.jsonl line."""
    cfg = fed.cfg
    t0 = time.perf_counter()
    record = {"round": rnd + 1, **fed.run_round(rnd)}
    record["train_seconds"] = time.perf_counter() - t0
    evaluated = (rnd + 1) % cfg.eval_freq == 0 or rnd + 1 == cfg.server_rounds
    if evaluated:
        t_eval = time.perf_counter()
        scores = fed.evaluation(fed.server_state, rnd=rnd)
        record.update(scores)
        record["eval_seconds"] = time.perf_counter() - t_eval
        progress.eval_keys = [*scores, "eval_seconds"]
    non_finite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if non_finite:  # checked before anything of this round is kept
        raise Diverged(f"round {rnd + 1}: {non_finite[0]} is {record[non_finite[0]]}")
    for key in [k for k in record if k.startswith("bytes_")]:
        progress.totals[key] = progress.totals.get(key, 0) + record[key]
        record[key + "_total"] = progress.totals[key]
    if cfg.noise_multiplier > 0:
        record["epsilon"] = finite_or_none(
            privacy.epsilon(cfg.noise_multiplier, cfg.server_batch / cfg.clients, rnd + 1, privacy.resolved_delta(cfg))
        )
    if evaluated:
        progress.evals.append(record)
    record["seconds"] = time.perf_counter() - t0
    progress.totals["elapsed_seconds"] = progress.totals.get("elapsed_seconds", 0.0) + record["seconds"]
    record["elapsed_seconds"] = progress.totals["elapsed_seconds"]  # training and evaluation so far
    return record


def finite_or_none(value: float) -> float | None:
    """Strict JSON has no Infinity: an unbounded epsilon is written as null."""
    return value if math.isfinite(value) else None


def describe_setup(fed: Federation, run, logger) -> None:
    """Log the config, model and partition; save partition.json."""
    cfg = fed.cfg
    logger.debug(f"config:\n{config_mod.dump(cfg)}")  # train.log and config.yaml; the screen gets a header
    info = {
        **models.describe(fed.model),
        "device": str(fed.device),
        "model": models.resolve_name(cfg),
        "train_examples": len(fed.task.train),
    }
    adapters = {-1: "full fine-tuning", 0: "head only"}.get(cfg.lora_rank, f"LoRA rank {cfg.lora_rank}")
    threads = torch.get_num_threads()
    threads = (
        f", {threads} thread{'s' if threads != 1 else ''}" if fed.device.type == "cpu" else ""
    ) + fed.world.describe()
    logger.info(
        f"run     {run.dir}  (full config: config.yaml, log: train.log)\n"
        f"model   {info['model']}, {adapters}: {info['trainable_params']:,} trainable of "
        f"{info['total_params']:,} parameters, on {fed.device}{threads}{', bf16' if cfg.bf16 else ''}\n"
        f"data    {cfg.dataset}: {info['train_examples']} training examples, {cfg.clients} clients "
        f"({resolved_partition(cfg)}), {cfg.server_batch} a round\n"
        f"rounds  {cfg.server_rounds} of algorithm {cfg.algorithm}: server {cfg.server_opt} lr {cfg.server_lr:g}, "
        f"{cfg.merging_strategy} "
        f"in {cfg.merge_space} space, density down {cfg.dl_density:g} / up {cfg.ul_density:g}"
    )
    labels, label_names = fed.task.skew_labels()
    report = partition_mod.report([c.numpy() for c in fed.clients], labels, label_names)
    if fed.task.dropped is not None:  # instructions: examples whose response does not fit in max_length
        report["summary"]["dropped_examples"] = fed.task.dropped
    tracking.write_json_atomic(run.dir / "partition.json", report)
    part = report["summary"]
    logger.info(
        f"partition: {part['examples']} training examples over {part['clients']} clients, "
        f"{part['min_examples']}..{part['max_examples']} each (median {part['median_examples']:g}, "
        f"{part['empty_clients']} empty)"
        + (
            f"; mean label TV distance from the whole {part['mean_label_tv_distance']:.3f}"
            if "mean_label_tv_distance" in part
            else ""
        )
    )
    dropped = part.get("dropped_examples")
    if dropped and any(dropped.values()):
        logger.info(
            "dropped: "
            + ", ".join(f"{n} {split}" for split, n in dropped.items())
            + " examples whose response (with its end token) does not fit in max_length "
            + str(cfg.max_length or DATASETS[cfg.dataset].default_max_length)
        )


def summarize(fed: Federation, progress: Progress, wall_time_s: float) -> dict:
    """The final metrics (all of the objective's), and the primary metric's best values."""
    cfg, evals, totals = fed.cfg, progress.evals, progress.totals
    p = fed.task.objective.primary
    final, best = evals[-1], max(evals, key=lambda r: r[f"val_{p}"])
    up_total, down_total = totals.get("bytes_up", 0), totals.get("bytes_down", 0)
    summary = {
        "primary_metric": p,
        **{k: v for k, v in final.items() if k.startswith(("test_", "val_", "personal_", "llm_"))},
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
        **models.describe(fed.model),
        "device": str(fed.device),
        "model": models.resolve_name(cfg),
        "train_examples": len(fed.task.train),
        **convergence.convergence(evals, p, cfg.target_accuracy),
    }
    if cfg.noise_multiplier > 0:
        dp_delta = privacy.resolved_delta(cfg)
        summary.update(
            epsilon=finite_or_none(
                privacy.epsilon(cfg.noise_multiplier, cfg.server_batch / cfg.clients, cfg.server_rounds, dp_delta)
            ),
            dp_delta=dp_delta,
            noise_multiplier=cfg.noise_multiplier,
            l2_clip_norm=cfg.l2_clip_norm,
        )
    return summary


# ---------------------------------------------------------------- the run
def train(
    cfg,
    console=None,
    resume_dir: Path | None = None,
    config_name: str | None = None,
    world: distributed.World | None = None,
    extend: bool = False,
) -> Path:
    """Run the whole federated training (or continue it from resume_dir); returns the run folder
    (on ranks other than 0, which write nothing, the folder rank 0 would write first).
    config_name: the --config it came from, recorded in config.yaml for tables and plots.
    world: the ranks of a torchrun launch (distributed.start); None: this process alone.
    extend: resume_dir continues to cfg.server_rounds rounds, which its saved config may not say."""
    with seeding.deterministic_algorithms(cfg.deterministic):
        try:
            return _train(cfg, console, resume_dir, config_name, world or distributed.World(), extend)
        except RuntimeError as e:
            if cfg.deterministic and "does not have a deterministic implementation" in str(e):
                op = str(e).split()[0]
                raise config_mod.ConfigError(
                    f"deterministic: true, but {op} has no deterministic implementation "
                    "on this device; expected deterministic: false for this model"
                ) from None
            raise


def open_run(cfg, device, world, console, resume_dir: Path | None, config_name: str | None, extend: bool = False):
    """The federation and its run folder: a new one, or resume_dir restored from its checkpoint
    (extend: to cfg.server_rounds rounds, from `--resume --server-rounds N`). Everything that can
    fail on bad input fails before a new run folder exists."""
    writes = world.is_main  # rank 0 alone writes the run folder
    lock = tracking.lock_run_dir(resume_dir, "--resume") if resume_dir is not None and writes else None
    run = fed = None
    try:
        fed = build(cfg, device, world)
        if resume_dir is None:
            run = (
                tracking.RunLog(fed.cfg, console, config_name=config_name)
                if writes
                else tracking.NoRunLog(Path(fed.cfg.dir) / fed.cfg.name)
            )
            fed.attach_store(run.dir)
            return fed, Progress(), run, None, None
        state = checkpoint.load(resume_dir, fed.cfg, fed.flat.numel, rounds_given=extend)
        fed.load_state(state["federation"])
        progress = Progress(**state["progress"])
        undo = last_only_evaluation(progress, state["server_rounds"], fed.cfg, resume_dir) if extend else None
        redo = state.get("metrics_redo")  # a continuation to more rounds that stopped half-way
        run = (
            tracking.RunLog(
                fed.cfg,
                console,
                existing=resume_dir,
                metrics_offset=state["metrics_offset"],
                metrics_digest=state.get("metrics_digest"),
                purge_step=progress.rounds_done + (0 if undo or redo else 1),
                lock=lock,
                metrics_redo=redo,
            )
            if writes
            else tracking.NoRunLog(resume_dir)
        )
        fed.attach_store(run.dir, state["federation"].get("client_states"))
        if undo:
            progress.evals.pop()  # metrics.jsonl follows in continue_to, after the checkpoint that says so
        return fed, progress, run, progress.rounds_done, undo
    except BaseException:
        if fed is not None and fed.store is not None:
            fed.store.close()
        if run is not None:
            run.close()
            if resume_dir is None and writes:  # a new run that could not start leaves no folder behind
                shutil.rmtree(run.dir, ignore_errors=True)
        if lock is not None:
            lock.close()
        raise


def last_only_evaluation(progress: Progress, planned: int | None, cfg, run_dir: Path) -> tuple | None:
    """A run continued past the round it was to end with: that round was evaluated because it was
    the last, which a run of cfg.server_rounds rounds does not do unless eval_freq says so. Returns
    (the round's record without its evaluation, or None for the initial model's round 0) when it
    must be undone, else None."""
    done = progress.rounds_done
    if planned != done or done >= cfg.server_rounds or not progress.evals or progress.evals[-1]["round"] != done:
        return None
    if done == 0:
        return (None,)  # a run of server_rounds 0 evaluated the initial model; a longer one does not
    if done % cfg.eval_freq == 0:
        return None  # evaluated by eval_freq anyway
    if not progress.eval_keys:
        raise checkpoint.CheckpointError(
            f"--server-rounds: {run_dir} was made by an earlier flasc that did not record which values of its last "
            "round came from its evaluation; it cannot be continued exactly: start it again with the new server_rounds"
        )
    return ({k: v for k, v in progress.evals[-1].items() if k not in progress.eval_keys},)


class Checkpoints:
    """The run's checkpoints (rank 0 writes them): every ckpt_freq rounds, at the end, and on an
    interrupt, each referring to client states flushed to disk before it."""

    def __init__(self, fed: Federation, run, progress: Progress, elapsed, saved_round: int | None):
        self.fed, self.run, self.progress, self.elapsed = fed, run, progress, elapsed
        self.saved_round = saved_round  # the round the last checkpoint holds (None: none yet)

    def due(self) -> bool:
        done, cfg = self.progress.rounds_done, self.fed.cfg
        return bool(cfg.ckpt_freq) and done % cfg.ckpt_freq == 0 and done < cfg.server_rounds

    def save(self, extra: dict | None = None) -> None:
        """extra: more entries for this checkpoint alone."""
        fed, progress = self.fed, self.progress
        if fed.world.is_main:
            if fed.store is not None:
                fed.store.flush()  # the states the checkpoint refers to are on disk before it is
            checkpoint.save(
                self.run.dir,
                {
                    "round": progress.rounds_done,
                    "server_rounds": fed.cfg.server_rounds,
                    "config_fingerprint": checkpoint.config_fingerprint(fed.cfg),
                    "federation": fed.state(),
                    "metrics_offset": self.run.metrics_offset(),
                    "metrics_digest": self.run.metrics_digest(),
                    "progress": {**vars(progress), "wall_time_s": self.elapsed()},
                    **(extra or {}),
                },
            )
            if fed.store is not None:
                fed.store.committed()
        self.saved_round = progress.rounds_done


def _train(
    cfg, console, resume_dir: Path | None, config_name: str | None, world: distributed.World, extend: bool = False
) -> Path:
    from loguru import logger

    started = time.time()
    if resume_dir is None:
        tracking.check_writable(cfg.dir)
    else:
        tracking.check_writable(str(resume_dir), "--resume")
    try:
        fed, progress, run, saved_round, undo = open_run(
            cfg, pick_device(cfg.gpu, world.local_rank), world, console, resume_dir, config_name, extend
        )
    except files.WriteFailed as e:  # open_run leaves no half-made run folder behind
        then = "the run could not start" + ("" if resume_dir else ", nothing was kept")
        raise files.WriteFailed(e.path, e.reason, e.errno, then) from None
    cfg = fed.cfg
    checkpoints = Checkpoints(fed, run, progress, lambda: progress.wall_time_s + time.time() - started, saved_round)
    screen = tracking.Screen(console is not None, world.size > 1, fed.task.objective.primary, logger)
    failure = None
    try:
        if extend:
            continue_to(fed, run, checkpoints, undo)
        return _rounds(fed, run, progress, checkpoints, screen, console, resume_dir, logger)
    except files.WriteFailed as e:  # every write names its file (flasc/runtime/files.py)
        failure = e
    finally:
        screen.close()
        closing = run.close()  # never raises: a failure to flush at the end is reported below
        if fed.store is not None:
            fed.store.close()
        if failure is None and closing is not None and sys.exc_info()[0] is None:
            failure = closing
        if failure is not None:
            raise stopped_writing(failure, run, checkpoints, resume_dir is None) from None


def continue_to(fed: Federation, run, checkpoints: Checkpoints, undo: tuple | None) -> None:
    """A run continued to another number of rounds. Its checkpoint first, kept for that number
    (and saying how metrics.jsonl's last line changes, when the old last round's evaluation is
    undone), then its old summary removed (the run is unfinished again), config.yaml saying the
    new number, and the line changed. Stopped anywhere in between, a resume finishes it."""
    with INTERRUPTS.deferred():
        redo = run.redo_plan(undo[0]) if undo else None
        checkpoints.save({"metrics_redo": redo} if redo else None)
        if not fed.world.is_main:
            return
        with files.naming(run.dir / "summary.json"):
            (run.dir / "summary.json").unlink(missing_ok=True)
        saved = run.dir / "config.yaml"
        first = config_mod.read_text(saved, "the run's saved config").split("\n", 1)[0]
        header = first + "\n" if first.startswith(tracking.CONFIG_COMMENT) else ""
        files.write_atomic(saved, header + config_mod.dump(fed.cfg))
        if redo:
            run.apply_redo(redo)


def stopped_writing(e: files.WriteFailed, run, checkpoints: Checkpoints, fresh: bool) -> files.WriteFailed:
    """The run's one line for a file it could not write (disk full, read-only...): what stays and
    how to go on. A new run with no checkpoint yet is removed: nothing in it could be resumed,
    and it would hold its name."""
    saved = checkpoints.saved_round
    if saved is not None:
        kept = (
            f"the run stops, {run.dir} keeps its checkpoint of round {saved}: free space (or make it writable) "
            f"and resume with: python train_lora.py --resume {run.dir}"
        )
    elif fresh:
        if isinstance(run, tracking.RunLog):  # rank 0's own folder (other ranks have none)
            shutil.rmtree(run.dir, ignore_errors=True)
        kept = f"the run stops before its first checkpoint and nothing was kept ({run.dir} removed)"
    else:
        kept = f"the run stops; {run.dir} is as it was"
    return files.WriteFailed(e.path, e.reason, e.errno, kept)


def _rounds(fed, run, progress: Progress, checkpoints: Checkpoints, screen, console, resume_dir, logger) -> Path:
    """The rounds from where the run is to its end, and the run's end: finished, interrupted or diverged."""
    cfg, world = fed.cfg, fed.world
    try:
        if resume_dir is None and world.is_main:
            describe_setup(fed, run, logger)
        elif world.is_main:
            with files.naming(run.dir / DIVERGED_FILE):
                (run.dir / DIVERGED_FILE).unlink(missing_ok=True)  # the run is live again
            logger.info(f"resumed {run.dir} after round {progress.rounds_done} of {cfg.server_rounds}")
        if cfg.server_rounds == 0 and not progress.evals:  # evaluate (and save) the initial model
            record = {
                "round": 0,
                **fed.evaluation(fed.server_state),
                "bytes_up_total": 0,
                "bytes_down_total": 0,
                "seconds": 0.0,
                "elapsed_seconds": 0.0,
            }
            run.log_round(record)
            progress.evals.append(record)
        fed.on_client = screen.on_client
        for rnd in screen.rounds(progress.rounds_done, cfg.server_rounds):
            with INTERRUPTS.deferred():  # from the server step to the checkpoint, a round is all or nothing
                record = round_record(fed, rnd, progress)
                run.log_round(record)
                progress.rounds_done = rnd + 1
                if checkpoints.due():
                    checkpoints.save()
            screen.round_done(record, progress.evals, progress.totals)
        with INTERRUPTS.deferred():
            return finish(fed, run, progress, checkpoints, logger)
    except Interrupted as e:
        INTERRUPTS.depth += 1  # further signals wait: the process is ending, let it save
        screen.close()
        if progress.rounds_done and checkpoints.saved_round != progress.rounds_done:
            checkpoints.save()  # the last completed round, so that nothing done is lost
        e.message = (
            f"interrupted ({e}) after round {checkpoints.saved_round} of {cfg.server_rounds}; resume with: "
            f"python train_lora.py --resume {run.dir}"
            if checkpoints.saved_round is not None
            else f"interrupted ({e}) before the first round ended; nothing to resume: start {run.dir.name} again"
        )
        logger.warning(e.message)
        e.shown = console is not None  # the console showed the line: main does not repeat it
        raise
    except Diverged as e:
        saved = checkpoints.saved_round
        kept = (
            f"{run.dir} keeps the checkpoint of round {saved} (python train_lora.py --resume {run.dir} "
            "continues from it)"
            if saved is not None
            else f"no checkpoint was written before it; start {run.dir.name} again with other settings"
        )
        logger.error(f"{e}: the run stops; {kept}")
        if world.is_main:
            tracking.write_json_atomic(run.dir / DIVERGED_FILE, {"reason": str(e), "checkpoint_round": saved})
        raise Diverged(f"{e}; {kept}") from None


def finish(fed: Federation, run, progress: Progress, checkpoints: Checkpoints, logger) -> Path:
    """The end state checkpointed (a crash while saving below resumes straight to saving), the
    evaluated model saved as the adapter (with the base-weight delta of FedEx-LoRA / FLoRA), the
    summary written."""
    checkpoints.save()
    fed.evaluation.scores.load(fed.server_state)  # the saved adapter is exactly the model evaluated last
    if fed.world.is_main:

        def fill(folder: Path) -> None:
            models.save_trained(fed.model, folder)
            if fed.algorithm.base is not None:
                fed.algorithm.base.save(folder)

        files.replace_folder(run.dir / "adapter", fill)  # whole or as it was: never half a model
    summary = summarize(fed, progress, checkpoints.elapsed())
    run.write_summary(summary)
    logger.info(
        f"done: {fed.cfg.algorithm}, {own_figure(fed, summary)}, {tracking.megabytes(summary['bytes_total'])} "
        "communicated, "
        f"{summary['wall_time_s']:.0f} s; results in {run.dir}"
    )
    return run.dir


def own_figure(fed: Federation, summary: dict) -> str:
    """The closing line's score: the algorithm's own figure (a personalised method's is the mean of
    its clients' own models, with the global model's test score beside it)."""
    p = summary["primary_metric"]
    test = f"test {p} {summary[f'test_{p}']:.4f}"
    if fed.algorithm.personalised and f"personal_{p}_mean" in summary:
        return f"personal {p} {summary[f'personal_{p}_mean']:.4f} (the clients' own models; global model's {test})"
    return test


# ---------------------------------------------------------------- the command line
USAGE = """usage: python train_lora.py [--config NAME] [--option-name value ...]
       python train_lora.py --resume RUN_DIR [--server-rounds N]
       python train_lora.py --list-configs

Options and their defaults are documented in configs/basic_config.yaml;
--config NAME overlays configs/NAME.yaml; command-line options override both."""


def parse_resume(argv: list[str]) -> tuple[config_mod.Config, Path, bool] | None:
    """--resume RUN_DIR [--server-rounds N]: the run's saved config (with N rounds), its folder,
    and whether N was given."""
    if "--resume" not in argv and not any(a.startswith("--resume=") for a in argv):
        return None
    args, folder = list(argv), None
    for i, a in enumerate(args):
        if a.startswith("--resume="):
            folder = args.pop(i).split("=", 1)[1]
            break
        if a == "--resume":
            args.pop(i)
            folder = args.pop(i) if i < len(args) and not args[i].startswith("--") else None
            break
    try:
        extra = config_mod.parse_overrides(args)
    except config_mod.ConfigError:
        extra = {"": None}
    if folder is None or set(extra) - {"server_rounds"}:
        other = next((a for a in args if a.startswith("--")), " ".join(args))
        raise config_mod.ConfigError(
            "--resume RUN_DIR continues a run with its saved config; it takes the folder and, to continue it to "
            "another number of rounds, --server-rounds N; no other option"
            + (f" (got {other})" if other and folder is not None else "")
        )
    run_dir = Path(folder)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise config_mod.ConfigError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
    try:
        values = config_mod.yaml_load(config_mod.read_text(saved, "the run's saved config"))
    except yaml.YAMLError:
        raise config_mod.ConfigError(f"--resume: {saved} is not valid YAML") from None
    if not isinstance(values, dict):
        raise config_mod.ConfigError(f"--resume: {saved} is not a config")
    return config_mod.from_mapping({**values, **extra}), run_dir, "server_rounds" in extra


def finished_rounds(run_dir: Path) -> int | None:
    """The rounds a finished run has (its summary.json says)."""
    try:
        return tracking.read_json(run_dir / "summary.json").get("rounds")
    except config_mod.ConfigError:
        return None


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
    repeated: list[str] = []
    cfg = config_mod.load_config(name, config_mod.parse_overrides(rest, repeated))
    if distributed.launched_ranks()[0] == 0:  # said once, by rank 0 of a torchrun launch
        for line in repeated:
            print(f"warning: {line}", file=sys.stderr)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """The command line; under torchrun every rank runs it (rank 0 alone prints and writes)."""
    from dotenv import load_dotenv
    from loguru import logger

    load_dotenv()  # a local .env may set CUDA_VISIBLE_DEVICES, HF_HOME, HF_HUB_OFFLINE...
    logger.remove()
    argv = sys.argv[1:] if argv is None else argv
    speaks = distributed.launched_ranks()[0] == 0  # the same error on every rank is printed once
    say = lambda text: print(text, file=sys.stderr) if speaks else None  # noqa: E731
    world = distributed.World()
    INTERRUPTS.install()
    if distributed.launched_ranks()[1] > 1:
        end_with_parent()  # a rank ends (and checkpoints) when its launcher is killed (also when main is imported)
    try:
        resume = parse_resume(argv)
        if resume is not None:
            cfg, run_dir, extend = resume
            if (run_dir / "summary.json").is_file() and finished_rounds(run_dir) == cfg.server_rounds:
                if speaks:
                    print(
                        f"{run_dir} is finished already (summary.json, {cfg.server_rounds} rounds); nothing to resume"
                        + ("" if extend else "; --server-rounds N continues it to N rounds")
                    )
                return 0
            world = start_world(cfg)
            console = tracking.console_sink if speaks else None
            train(cfg, console=console, resume_dir=run_dir, world=world, extend=extend)
            return 0
        cfg = parse_cli(argv)
        if cfg is None:
            return 0
        world = start_world(cfg)
        train(
            cfg,
            console=tracking.console_sink if speaks else None,
            config_name=config_mod.split_config_arg(argv)[0],
            world=world,
        )
    except (config_mod.ConfigError, DataUnavailable, models.ModelUnavailable, checkpoint.CheckpointError) as e:
        say(f"error: {e}")
        return EXIT_CODE["bad_input"]
    except Diverged as e:
        say(f"error: {e}")
        return EXIT_CODE["diverged"]
    except files.WriteFailed as e:
        say(f"error: {e}")
        return EXIT_CODE["write_failed"]
    except distributed.RankFailed as e:
        say(f"error: {e}")
        return EXIT_CODE["failed"]
    except distributed.RankLost as e:  # rank 0 may be the one that died: every rank says it
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CODE["failed"]
    except Interrupted as e:
        if not getattr(e, "shown", False):
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
