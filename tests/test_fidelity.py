"""Bugs found in review (each failed before its fix) and the options that reproduce the FLASC code."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import config
import merging
import train_lora
from model_merging_methods import dare_drop


def build(tiny_overrides, **extra):
    cfg = config.load_config(overrides={**tiny_overrides, **extra})
    return cfg, train_lora.build(cfg, torch.device("cpu"))


# ---------------------------------------------------------------- full fine-tuning without gradients
@pytest.mark.parametrize("extra", [{"mu": 0.1}, {"client_freeze": True, "dl_density": 0.5}])
def test_full_finetuning_with_fedprox_or_client_freeze_runs(tiny_overrides, extra):
    # BERT's pooler is never reached by the mean-pool head: its grad stays None, which crashed
    # the FedProx term and the client_freeze gradient mask
    cfg, fed = build(tiny_overrides, lora_rank=-1, **extra)
    fed.run_round(0)
    assert torch.isfinite(fed.server.detach()).all()


def test_parameters_without_a_gradient_are_neither_trained_nor_exchanged(tiny_overrides):
    cfg, fed = build(tiny_overrides, lora_rank=-1)
    names = set(fed.flat.names)
    assert not any("pooler" in n for n in names)
    every = {n for n, _ in fed.model.named_parameters()}
    assert {n for n in every if "pooler" not in n} == names  # everything else trains
    batch = fed.task.train.batch(torch.arange(8))
    loss = fed.task.objective.loss(fed.model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch)
    loss.backward()
    assert all(p.grad is not None for p in fed.flat.params)


def test_fedprox_term_reaches_a_parameter_the_data_loss_does_not(tiny_overrides):
    # FedProx's (mu/2)||w - w0||^2 covers every trained tensor: one with no data gradient still
    # gets mu (w - w0)
    from flasc.client.optimizers import proximal_grad_

    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    (used * 2).sum().backward()
    anchors = [torch.zeros(2), torch.tensor([1.0, 1.0])]
    proximal_grad_([used, unused], anchors, 0.5)
    torch.testing.assert_close(used.grad, torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(unused.grad, torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------- seeded draws on another device
class GeneratorDeviceCheck(TorchFunctionMode):
    """Raises, as CUDA does, when a seeded draw is given a generator of another device than the
    tensors it fills. Meta tensors stand in for CUDA ones on a machine without a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None:
            devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            if kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]).type)
            if devices - {gen.device.type}:
                raise RuntimeError(
                    f"Expected a '{devices.pop()}' device type for generator but found '{gen.device.type}'"
                )
        return func(*args, **kwargs)


def test_dare_masks_are_drawn_on_the_generators_device_and_moved():
    task = torch.randn(6, 5)
    g = torch.Generator().manual_seed(3)
    expected = dare_drop(task, 0.5, g)
    with GeneratorDeviceCheck():
        out = dare_drop(task.to("meta"), 0.5, torch.Generator().manual_seed(3))
        blocks = merging.dare_blocks({"w": torch.randn(2, 4, 3, device="meta")}, 0.3, 0, 1, [4, 7])
    assert out.device.type == "meta" and blocks["w"].shape == (2, 4, 3)
    # the same draw as on the CPU: which entries survive does not depend on the device
    kept = torch.bernoulli(torch.full((6, 5), 0.5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(expected, task * kept / 0.5)


def test_dp_noise_is_drawn_on_the_cpu_and_moved():
    from flasc.federation import privacy

    with GeneratorDeviceCheck():
        out = privacy.noisy_mean(torch.zeros(4, device="meta"), 2, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert out.device.type == "meta"


# ---------------------------------------------------------------- server adamw
def test_adamw_is_torch_adamw_with_torch_defaults_and_matches_the_formula(tiny_overrides):
    from flasc.federation.optimizers import SERVER_OPTIMIZERS

    cfg = config.load_config(overrides={**tiny_overrides, "server_opt": "adamw", "server_lr": 0.1})
    assert (cfg.beta1, cfg.beta2, cfg.tau, cfg.weight_decay) == (0.9, 0.999, 1e-8, 0.01)
    x0, grads = [1.0, -2.0, 0.0], [[0.5, 0.1, -0.2], [-0.3, 0.4, 0.0]]
    ours = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    ref = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt, ref_opt = SERVER_OPTIMIZERS["adamw"]([ours], cfg), torch.optim.AdamW([ref], lr=0.1)
    for g in grads:
        for p, o in ((ours, opt), (ref, ref_opt)):
            p.grad = torch.tensor(g, dtype=torch.float64)
            o.step()
        assert torch.equal(ours.detach(), ref.detach())
    # Loshchilov & Hutter's AdamW, bias-corrected, by hand
    want = []
    for i, x in enumerate(x0):
        m = v = 0.0
        for t, g in enumerate((gr[i] for gr in grads), start=1):
            x -= 0.1 * 0.01 * x
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            x -= 0.1 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)) ** 0.5 + 1e-8)
        want.append(x)
    assert ours.detach().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_server_defaults_resolve_into_the_saved_config(tiny_overrides):
    fedadam = config.load_config("fedadam", {**tiny_overrides})
    assert (fedadam.beta2, fedadam.tau, fedadam.weight_decay) == (0.99, 1e-3, None)
    tuned = config.load_config(overrides={**tiny_overrides, "server_opt": "adamw", "beta2": 0.98, "weight_decay": 0.0})
    assert (tuned.beta2, tuned.tau, tuned.weight_decay) == (0.98, 1e-8, 0.0)
    assert config.from_mapping(dict(tuned)) == tuned
    with pytest.raises(config.ConfigError, match="weight_decay: .*adamw"):
        config.load_config(overrides={**tiny_overrides, "server_opt": "adam", "weight_decay": 0.01})


# ---------------------------------------------------------------- base_dropout
def test_base_dropout_false_leaves_only_the_lora_dropout_active(tiny_overrides, monkeypatch):
    from peft.tuners.lora import LoraLayer

    cfg, fed = build(tiny_overrides, base_dropout=False, lora_dropout=0.5)
    seen = {}
    lora_dropouts = {id(d) for m in fed.model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()}

    def spy(model, *args):  # the modes during each local training forward pass
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                seen.setdefault("lora" if id(m) in lora_dropouts else "base", set()).add(m.training)
        return real(model, *args)

    from flasc.client import worker as clients

    real = clients.logits_of
    monkeypatch.setattr(clients, "logits_of", spy)
    fed.run_round(0)
    assert seen["lora"] == {True} and seen["base"] == {False}
    # with the LoRA dropout at 0 the training forward pass is then deterministic
    cfg, fed = build(tiny_overrides, base_dropout=False, lora_dropout=0.0)
    from flasc.models import training_mode

    training_mode(fed.model, cfg.base_dropout)
    batch = {k: v for k, v in fed.task.train.batch(torch.arange(4)).items() if k != "labels"}
    assert torch.equal(fed.model(**batch).logits, fed.model(**batch).logits)
    training_mode(fed.model, True)  # the default: the base model's dropout draws
    assert not torch.equal(fed.model(**batch).logits, fed.model(**batch).logits)


# ---------------------------------------------------------------- dp_divide_by_clip
def test_dp_divide_by_clip_is_the_originals_aggregate(tiny_overrides, monkeypatch):
    import numpy as np

    from flasc.runtime import seeding

    clip, sigma, lr = 0.5, 0.3, 2.0
    cfg, fed = build(
        tiny_overrides, server_batch=2, l2_clip_norm=clip, noise_multiplier=sigma, dp_divide_by_clip=True, server_lr=lr
    )
    n = fed.flat.numel
    s0 = fed.server.detach().numpy().copy()
    rng = np.random.default_rng(5)
    deltas = {c: rng.normal(size=n).astype(np.float32) * (0.1 if c % 2 else 3.0) for c in range(cfg.clients)}

    def fake_train(rnd, client, start, grad_mask, extras=None):
        return start - torch.from_numpy(deltas[client]), {"loss_sum": 0.0, "correct": 0, "count": 1, "epochs": 1}

    monkeypatch.setattr(fed.worker, "train_client", fake_train)
    sampled = fed.sample_clients(0)
    fed.run_round(0)
    # the FLASC code: clip each update to norm C, sum, divide by C, add N(0, sigma^2), divide by m
    clipped = [d * min(1.0, clip / np.linalg.norm(d.astype(np.float64))) for d in (deltas[c] for c in sampled)]
    z = torch.randn(n, generator=seeding.torch_generator(cfg.seed, "noise", 0)).numpy()
    pseudo = (np.sum(clipped, axis=0) / clip + sigma * z) / len(sampled)
    np.testing.assert_allclose(fed.server.detach().numpy(), s0 - lr * pseudo, rtol=1e-5, atol=1e-6)
    with pytest.raises(config.ConfigError, match="dp_divide_by_clip: .*l2_clip_norm"):
        config.load_config(overrides={**tiny_overrides, "dp_divide_by_clip": True})


def test_augment_is_refused_for_text(tiny_overrides):
    with pytest.raises(config.ConfigError, match="augment: dataset toy has text"):
        config.load_config(overrides={**tiny_overrides, "augment": True})


# ---------------------------------------------------------------- deterministic
def test_deterministic_turns_on_torchs_deterministic_mode_for_the_run_only(tiny_overrides, monkeypatch):
    import json
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real = train_lora.Federation.run_round

    def spy(self, rnd):
        seen.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                torch.backends.cudnn.benchmark,
                torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(),
            )
        )
        return real(self, rnd)

    monkeypatch.setattr(train_lora.Federation, "run_round", spy)
    runs = [
        train_lora.train(config.load_config(overrides={**tiny_overrides, "deterministic": True, "name": n}))
        for n in ("a", "b")
    ]
    assert set(seen) == {(True, ":4096:8", False, False, False)}  # attention on the math kernel
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    metrics = [
        [
            {k: v for k, v in json.loads(line).items() if "seconds" not in k}
            for line in (r / "metrics.jsonl").read_text().splitlines()
        ]
        for r in runs
    ]
    assert metrics[0] == metrics[1]


def test_an_op_without_deterministic_kernel_is_one_clear_error(tiny_overrides, monkeypatch):
    def fail(*args):
        raise RuntimeError(
            "adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, "
            "but you set 'torch.use_deterministic_algorithms(True)'"
        )

    monkeypatch.setattr(train_lora, "_train", fail)
    cfg = config.load_config(overrides={**tiny_overrides, "deterministic": True})
    with pytest.raises(config.ConfigError, match="deterministic: true, but adaptive_avg_pool2d_backward_cuda"):
        train_lora.train(cfg)
    assert not torch.are_deterministic_algorithms_enabled()


def test_efficientnet_pools_by_mean_with_the_values_of_adaptive_pooling():
    from flasc.models.build import GlobalMeanPool

    x = torch.randn(3, 16, 2, 2, requires_grad=True)
    y = torch.randn(3, 16, 5, 7)
    for t in (x, y):
        torch.testing.assert_close(
            GlobalMeanPool()(t), torch.nn.functional.adaptive_avg_pool2d(t, 1), rtol=0, atol=1e-7
        )


@pytest.mark.parametrize("space", ["factors", "product"])
def test_regmean_under_bf16_keeps_fp32_gram_matrices(tiny_overrides, space):
    # found by bench/gpu_check.py: the Gram products ran inside the forward's bf16 autocast
    cfg, fed = build(tiny_overrides, merging_strategy="regmean", merge_space=space, bf16=True)
    fed.run_round(0)
    assert torch.isfinite(fed.server.detach()).all()
    from flasc.client import statistics as merge_statistics

    batch = fed.task.train.batch(torch.arange(6))
    grams = merge_statistics.input_grams(fed.resident, batch, fed.aggregator.pairs)
    assert all(g.dtype == torch.float32 for g in grams.values())


# ---------------------------------------------------------------- one description of each optimizer
def test_the_docs_describe_each_server_optimizer_once_and_truly():
    import re
    from pathlib import Path

    from flasc.federation.optimizers import SERVER_OPTIMIZERS

    root = Path(__file__).resolve().parents[1]
    readme = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    rules = {
        name: [line for line in readme.splitlines() if re.match(rf"^ {{4}}{name}\s+\(", line)]
        for name in SERVER_OPTIMIZERS
    }
    assert all(len(lines) == 1 for lines in rules.values()), rules
    # FedAdam has no bias correction (test_optimizers checks the code); AdamW has it
    assert "1−β1^t" not in rules["adam"][0] and "1−β1^t" in rules["adamw"][0]
    assert not re.search(r"`adam` is bias-corrected", readme)
