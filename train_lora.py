"""Federated LoRA with sparse communication (FLASC), simulated in one process.

    python train_lora.py --config flasc --server-rounds 20 --dl-density 0.1

Each round: sample clients -> download the server adapter, top-k masked at dl_density -> dense
local training -> upload update = (server ⊙ mask) − client, top-k at ul_density -> aggregate
(merging strategy) -> server optimizer step on the pseudo-gradient -> evaluate, log, save.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import communication
import config as config_mod
import merging
import models
import seeding
from data import DataUnavailable, Task, load_task
from data import partition as partition_mod
from evaluation import evaluate, logits_of
from optimizers import CLIENT_OPTIMIZERS, SERVER_OPTIMIZERS, proximal_grad_, server_schedule
from state import FlatParams


# ---------------------------------------------------------------- setup
def pick_device(gpu: str) -> torch.device:
    if gpu == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if gpu == "auto":
            return torch.device("cpu")
        raise config_mod.ConfigError(f"gpu: CUDA device {gpu} was asked for but no CUDA device is "
                                     "visible; expected auto or cpu")
    if gpu == "auto":
        return torch.device("cuda", 0)
    if int(gpu) >= torch.cuda.device_count():
        raise config_mod.ConfigError(f"gpu: device {gpu} does not exist; expected an index below "
                                     f"{torch.cuda.device_count()}, auto or cpu")
    return torch.device("cuda", int(gpu))


def make_clients(cfg, task: Task) -> list[torch.Tensor]:
    """Index tensors into task.train, one per client."""
    rng = seeding.numpy_rng(cfg.seed, "partition")
    labels = task.train.labels.numpy()
    try:
        if cfg.partition == "iid":
            parts = partition_mod.iid(len(labels), cfg.clients, rng, cfg.min_client_size)
        else:
            parts = partition_mod.dirichlet(labels, cfg.clients, cfg.iid_alpha, rng, cfg.min_client_size)
    except ValueError as e:
        raise config_mod.ConfigError(str(e)) from None
    return [torch.from_numpy(p) for p in parts]


# ---------------------------------------------------------------- one round
@dataclass
class Federation:
    """Everything a round needs: the one resident model, the data and the server state."""
    cfg: config_mod.Config
    model: torch.nn.Module
    task: Task
    clients: list[torch.Tensor]
    device: torch.device
    flat: FlatParams = field(init=False)
    server: torch.nn.Parameter = field(init=False)
    server_opt: torch.optim.Optimizer = field(init=False)
    schedule: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    aggregator: merging.Aggregator = field(init=False)
    frozen_mask: torch.Tensor | None = field(init=False, default=None)
    eval_mask: torch.Tensor | None = field(init=False, default=None)  # last round's download mask

    def __post_init__(self):
        self.flat = FlatParams(self.model)
        self.server = torch.nn.Parameter(self.flat.read())
        self.server_opt = SERVER_OPTIMIZERS[self.cfg.server_opt]([self.server], self.cfg)
        self.schedule = server_schedule(self.server_opt, self.cfg.server_schedule, self.cfg.server_rounds)
        self.aggregator = merging.Aggregator(self.cfg, self.model, self.flat)

    # -- download
    def download_mask(self, rnd: int, density: float) -> torch.Tensor | None:
        """Global top-k of |server| (None = dense). server_freeze: round 0 is dense, the mask
        computed at round 1 is kept for the rest of the run (as in the FLASC seeds)."""
        if self.cfg.server_freeze:
            if rnd == 0:
                return None
            if self.frozen_mask is None:
                self.frozen_mask = communication.topk_mask(self.server.detach(), density)
            return self.frozen_mask
        if density >= 1:
            return None
        return communication.topk_mask(self.server.detach(), density)

    def masked_server(self, mask: torch.Tensor | None) -> torch.Tensor:
        server = self.server.detach()
        return server.clone() if mask is None else server * mask

    # -- local training
    def sample_clients(self, rnd: int) -> list[int]:
        g = seeding.torch_generator(self.cfg.seed, "sampling", rnd)
        return sorted(torch.randperm(len(self.clients), generator=g)[: self.cfg.server_batch].tolist())

    def client_epochs(self, rnd: int, client: int):
        """For each local epoch, the client's minibatches in a seeded order."""
        g = seeding.torch_generator(self.cfg.seed, "client", rnd, client)
        idx = self.clients[client]
        for _ in range(self.cfg.client_epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            yield (self.task.train.batch(order[s:s + self.cfg.client_batch])
                   for s in range(0, len(order), self.cfg.client_batch))

    def client_batches(self, rnd: int, client: int):
        """All the client's minibatches of a round, epoch after epoch (without early stopping)."""
        for epoch in self.client_epochs(rnd, client):
            yield from epoch

    def client_examples(self, rnd: int, client: int, count: int) -> dict:
        """Up to `count` of the client's examples in a seeded order, for merge statistics."""
        g = seeding.torch_generator(self.cfg.seed, "stats", rnd, client)
        idx = self.clients[client]
        return self.task.train.batch(idx[torch.randperm(len(idx), generator=g)[:count]])

    def train_client(self, rnd: int, client: int, start: torch.Tensor,
                     grad_mask: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
        """Load `start` into the model, train locally, return the client's flat parameters."""
        cfg = self.cfg
        self.flat.write(start)
        # Dropout draws from torch's global generator: seed it per (seed, round, client).
        torch.manual_seed(seeding.derive_seed(cfg.seed, "client", rnd, client, 1))
        opt = CLIENT_OPTIMIZERS[cfg.client_opt](self.flat.params, cfg.client_lr)
        anchors = self.flat.split(start) if cfg.mu > 0 else None
        self.model.train()
        loss_sum, correct, count, epochs_run = 0.0, 0, 0, 0
        for epoch in self.client_epochs(rnd, client):
            epoch_correct, epoch_count = 0, 0
            for batch in epoch:
                logits = logits_of(self.model, batch, self.device, cfg.bf16)
                labels = batch["labels"].to(self.device)
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if anchors is not None:  # FedProx: pull towards the downloaded model
                    proximal_grad_(self.flat.params, anchors, cfg.mu)
                if grad_mask is not None:  # client_freeze: train only the downloaded entries
                    for p, m in zip(self.flat.params, grad_mask):
                        p.grad.mul_(m)
                opt.step()
                n = len(labels)
                loss_sum += loss.item() * n
                epoch_correct += int((logits.argmax(-1) == labels).sum())
                epoch_count += n
            correct, count, epochs_run = correct + epoch_correct, count + epoch_count, epochs_run + 1
            if cfg.early_stopping > 0 and epoch_count and epoch_correct / epoch_count >= cfg.early_stopping:
                break
        return self.flat.read(), {"loss_sum": loss_sum, "correct": correct, "count": count,
                                  "epochs": epochs_run}

    def run_round(self, rnd: int) -> dict:
        cfg = self.cfg
        n = self.flat.numel
        dl_density = communication.density_at(cfg.dl_density, cfg.dl_density_decay, cfg.decay_freq, rnd)
        ul_density = communication.density_at(cfg.ul_density, cfg.ul_density_decay, cfg.decay_freq, rnd)
        mask = self.download_mask(rnd, dl_density)
        start = self.masked_server(mask)
        grad_mask = self.flat.split(mask.to(start.dtype)) if (cfg.client_freeze and mask is not None) else None
        dl_bytes = communication.message_bytes(n, n if mask is None else int(mask.sum()))

        updates, norms, ul_bytes, stats_seconds = [], [], 0, 0.0
        totals = {"loss_sum": 0.0, "correct": 0, "count": 0, "epochs": 0}
        for client in self.sample_clients(rnd):
            client_params, stats = self.train_client(rnd, client, start, grad_mask)
            delta = start - client_params
            if ul_density < 1:
                ul_mask = communication.topk_mask(delta, ul_density)
                delta = delta * ul_mask
                ul_bytes += communication.message_bytes(n, int(ul_mask.sum()))
            else:
                ul_bytes += communication.message_bytes(n, n)
            norms.append(float(delta.norm()))
            update = merging.ClientUpdate(client, delta, len(self.clients[client]))
            if self.aggregator.strategy.statistic:  # Fisher / Gram of the uploaded client model
                t_stats = time.perf_counter()
                self.flat.write(start - delta)
                n_stats = cfg.fisher_examples if self.aggregator.strategy.statistic == "fisher" else cfg.regmean_examples
                update.stats, extra_values = self.aggregator.client_statistics(
                    self, self.client_examples(rnd, client, n_stats))
                ul_bytes += communication.VALUE_BYTES * extra_values
                stats_seconds += time.perf_counter() - t_stats
            updates.append(update)
            for k in totals:
                totals[k] += stats[k]

        pseudo_grad, merge_info = self.aggregator.aggregate(updates, start, rnd)
        server_lr = self.server_opt.param_groups[0]["lr"]
        self.server_opt.zero_grad(set_to_none=True)
        self.server.grad = pseudo_grad.to(self.server.dtype)
        self.server_opt.step()
        self.schedule.step()

        self.eval_mask = mask
        count = max(totals["count"], 1)
        return {
            "train_loss": totals["loss_sum"] / count,
            "train_accuracy": totals["correct"] / count,
            "local_epochs": totals["epochs"] / len(updates),
            "server_lr": server_lr,
            "stats_seconds": stats_seconds,
            **merge_info,
            "update_norm": sum(norms) / len(norms),
            "dl_density": dl_density,
            "ul_density": ul_density,
            "bytes_down": dl_bytes * len(updates),
            "bytes_up": ul_bytes,
        }

    # -- evaluation
    def load_eval_model(self) -> None:
        """Put the server model into the resident model: masked with the last download mask
        when eval_masked (what clients actually receive), else dense."""
        mask = self.eval_mask if self.cfg.eval_masked else None
        self.flat.write(self.masked_server(mask))

    def evaluate(self, splits=("val", "test")) -> dict:
        self.load_eval_model()
        out = {}
        for split in splits:
            stats = evaluate(self.model, getattr(self.task, split), self.cfg.eval_batch, self.device,
                             self.cfg.bf16, self.task.num_labels)
            out.update({f"{split}_{k}": v for k, v in stats.items()})
        return out


# ---------------------------------------------------------------- the run
def build(cfg, device: torch.device) -> Federation:
    """Data, model and server state; raises DataUnavailable / ModelUnavailable / ConfigError."""
    tokenizer, tag = models.load_tokenizer(cfg)
    task = load_task(cfg.dataset, cfg.data_dir, tokenizer, tag, cfg.max_length)
    clients = make_clients(cfg, task)
    model = models.build_model(cfg, task.num_labels, tokenizer.pad_token_id).to(device)
    return Federation(cfg, model, task, clients, device)


def train(cfg, console=None) -> Path:
    """Run the whole federated training; returns the run folder."""
    import tracking
    from loguru import logger
    from tqdm import tqdm

    started = time.time()
    device = pick_device(cfg.gpu)
    fed = build(cfg, device)  # everything that can fail on bad input fails before the run folder exists
    run = tracking.RunLog(cfg, console)
    try:
        logger.info(f"run folder {run.dir}\n{config_mod.dump(cfg)}")
        info = {**models.describe(fed.model), "device": str(device), "model": models.resolve_name(cfg),
                "train_examples": len(fed.task.train), "client_sizes": [len(c) for c in fed.clients]}
        logger.info(f"{info['trainable_params']} trainable of {info['total_params']} parameters on {device}; "
                    f"{len(fed.task.train)} training examples over {cfg.clients} clients "
                    f"(sizes {min(info['client_sizes'])}..{max(info['client_sizes'])})")
        record, evals = {}, []
        up_total = down_total = 0
        if cfg.server_rounds == 0:  # evaluate (and save) the initial model
            record = {"round": 0, **fed.evaluate(), "bytes_up_total": 0, "bytes_down_total": 0,
                      "seconds": 0.0}
            run.log_round(record)
            evals.append(record)
        bar = tqdm(range(cfg.server_rounds), desc="rounds", disable=console is None, file=sys.stderr)
        for rnd in bar:
            t0 = time.perf_counter()
            record = {"round": rnd + 1, **fed.run_round(rnd)}
            record["train_seconds"] = time.perf_counter() - t0
            up_total += record["bytes_up"]
            down_total += record["bytes_down"]
            record.update(bytes_up_total=up_total, bytes_down_total=down_total)
            if (rnd + 1) % cfg.eval_freq == 0 or rnd + 1 == cfg.server_rounds:
                t_eval = time.perf_counter()
                record.update(fed.evaluate())
                record["eval_seconds"] = time.perf_counter() - t_eval
                evals.append(record)
            record["seconds"] = time.perf_counter() - t0
            run.log_round(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}",
                            test=f"{evals[-1]['test_accuracy']:.3f}" if evals else "-")
            if "test_accuracy" in record:
                logger.info(f"round {rnd + 1}: train loss {record['train_loss']:.4f}, "
                            f"val acc {record['val_accuracy']:.4f}, test acc {record['test_accuracy']:.4f}, "
                            f"MB up/down {up_total / 1e6:.2f}/{down_total / 1e6:.2f}")
        fed.load_eval_model()  # the saved adapter is exactly the model evaluated last
        models.save_trained(fed.model, run.dir / "adapter")
        final, best = evals[-1], max(evals, key=lambda r: r["val_accuracy"])
        summary = {
            "test_accuracy": final["test_accuracy"],
            "test_macro_f1": final["test_macro_f1"],
            "test_loss": final["test_loss"],
            "val_accuracy": final["val_accuracy"],
            "best_test_accuracy": max(r["test_accuracy"] for r in evals),
            "best_val_accuracy": best["val_accuracy"],
            "test_accuracy_at_best_val": best["test_accuracy"],
            "bytes_up": up_total,
            "bytes_down": down_total,
            "bytes_total": up_total + down_total,
            "rounds": cfg.server_rounds,
            "wall_time_s": time.time() - started,
            **info,
        }
        run.write_summary(summary)
        logger.info(f"done: test accuracy {summary['test_accuracy']:.4f}, "
                    f"{(up_total + down_total) / 1e6:.2f} MB communicated, "
                    f"{summary['wall_time_s']:.0f} s; results in {run.dir}")
        return run.dir
    finally:
        run.close()


USAGE = """usage: python train_lora.py [--config NAME] [--option-name value ...]
       python train_lora.py --list-configs

Options and their defaults are documented in configs/basic_config.yaml;
--config NAME overlays configs/NAME.yaml; command-line options override both."""


def parse_cli(argv: list[str]) -> config_mod.Config | None:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return None
    if "--list-configs" in argv:
        print("\n".join(config_mod.list_configs()))
        return None
    name, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            if "=" in argv[i]:
                name = argv[i].split("=", 1)[1]
            elif i + 1 < len(argv):
                name, i = argv[i + 1], i + 1
            else:
                raise config_mod.ConfigError("--config needs a name; see --list-configs")
        else:
            rest.append(argv[i])
        i += 1
    return config_mod.load_config(name, config_mod.parse_overrides(rest))


def main(argv: list[str] | None = None) -> int:
    import tracking
    from dotenv import load_dotenv
    from loguru import logger

    load_dotenv()  # a local .env may set CUDA_VISIBLE_DEVICES, HF_HOME, HF_HUB_OFFLINE...
    logger.remove()
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
        if cfg is None:
            return 0
        train(cfg, console=tracking.console_sink)
    except (config_mod.ConfigError, DataUnavailable, models.ModelUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
