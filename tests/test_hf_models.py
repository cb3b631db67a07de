"""Any Hugging Face model by folder (issue 24): tiny random models of several architectures, built
here from transformers' config classes and saved with MiniLM's tokenizer (no download), train
through the generic path with no code of their own; the saved adapter re-scores to the reported
metric."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL, argv_of, image_overrides, reloaded_test_metrics

import config
import train_lora
from flasc import models

ARCHITECTURES = [
    "llama",
    "qwen2",
    "mistral",
    "gemma2",
    "phi3",
    "gpt_neox",
    "opt",
    "roberta",
    "deberta-v2",
    "distilbert",
    "gpt2",
]


# one algorithm with client or server state per architecture: client states (FedSA's A, SCAFFOLD's
# control variates), base weights folded by the server (FedEx-LoRA, FLoRA; GPT-2's Conv1D transposed),
# rank tiers' SVD and truncation (FlexLoRA, HetLoRA), and the 2025 methods (RoLoRA's alternation,
# FedSVD's re-factoring, LoRA-FAIR's correction; Fed-SB's gradients of GPT-2's transposed Conv1D weights)
STATEFUL = {
    "llama": "fedsa",
    "qwen2": "flexlora",
    "mistral": "scaffold",
    "gemma2": "fedex",
    "phi3": "flora",
    "gpt_neox": "rolora",
    "opt": "hetlora",
    "roberta": "lorafair",
    "deberta-v2": "fedex",
    "distilbert": "fedsvd",
    "gpt2": "fedsb",
}


@pytest.mark.parametrize(
    "arch, algorithm",
    [(a, "fedavg") for a in ARCHITECTURES] + list(STATEFUL.items()),
)
def test_a_saved_model_folder_trains_and_its_adapter_rescores(model_folders, tiny_overrides, tmp_path, arch, algorithm):
    """fedavg on every architecture; stateful and product-space algorithms on some."""
    overrides = {**tiny_overrides, "model": str(model_folders[arch]), "server_rounds": 2, "algorithm": algorithm}
    argv = argv_of(overrides)
    assert train_lora.main(argv) == 0
    run_dir = tmp_path / "runs" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    again = reloaded_test_metrics(run_dir)
    assert again["accuracy"] == summary["test_accuracy"]
    assert again["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    model = models.load_trained(
        config.from_mapping(config.yaml_load((run_dir / "config.yaml").read_text())), run_dir / "adapter", 3, 0
    )
    # LoRA where peft puts it for the architecture (every linear layer where it has no default), a head
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    expected = PEFT.get(model.base_model.model.config.model_type)
    assert lora == set(expected) if expected else len(lora) >= 4
    # what trained: the head and the LoRA factors (Fed-SB: an r × r R a layer, folded into the saved B)
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    layers = [n for n, _ in model.named_parameters() if n.endswith(".lora_A.default.weight")]
    factors = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert head > 0
    assert summary["trainable_params"] == head + (len(layers) * 4**2 if algorithm == "fedsb" else factors)


def test_a_model_that_is_neither_a_name_nor_a_folder_is_one_line(tiny_overrides, capsys, tmp_path):
    argv = argv_of({k: v for k, v in tiny_overrides.items() if k != "model"})
    assert train_lora.main([*argv, "--model", "minlm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model: 'minlm' is out of range; expected auto, one of ")
    assert "a Hugging Face model id (org/name) or a model folder" in err[0]
    assert train_lora.main([*argv, "--model", str(tmp_path / "no" / "such")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a Hugging Face model folder" in err[0], err


@pytest.mark.parametrize(
    "chosen, expected",
    [
        (["q_proj", "k_proj", "v_proj", "o_proj"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (["all-linear"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_lora_target_modules_chooses_where_lora_goes(model_folders, tiny_overrides, chosen, expected):
    from train_lora import build, pick_device

    overrides = {**tiny_overrides, "model": str(model_folders["llama"]), "lora_target_modules": chosen}
    fed = build(config.load_config(overrides=overrides), pick_device("cpu"))
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in fed.model.named_parameters() if ".lora_A" in n}
    assert lora == expected  # every linear layer of the decoder, not the score head


def test_a_lora_target_the_model_lacks_is_one_line(model_folders, tiny_overrides, capsys):
    overrides = {**tiny_overrides, "model": str(model_folders["llama"]), "lora_target_modules": ["query"]}
    argv = argv_of(overrides)
    assert train_lora.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: lora_target_modules: the model has no linear layer named query; expected names among "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"
    ]


def test_gradient_checkpointing_gives_the_same_round(model_folders, tiny_overrides):
    """Recomputed activations, the same update: a round with it equals a round without (no dropout)."""
    from train_lora import build, pick_device

    servers, starts = [], []
    for on in (False, True):
        overrides = {**tiny_overrides, "model": str(model_folders["llama"]), "gradient_checkpointing": on}
        fed = build(config.load_config(overrides={**overrides, "lora_dropout": 0.0}), pick_device("cpu"))
        inner = fed.model.base_model.model
        assert inner.is_gradient_checkpointing == on
        starts.append(fed.server.detach().clone())
        fed.run_round(0)
        servers.append(fed.server.detach().clone())
    torch.testing.assert_close(servers[0], servers[1], rtol=1e-6, atol=1e-7)
    assert torch.equal(starts[0], starts[1]) and not torch.equal(servers[0], starts[0])  # same start, it trained


def test_revision_remote_code_and_attention_reach_from_pretrained(model_folders, tiny_overrides, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    seen = []
    for cls in (AutoModelForSequenceClassification, AutoTokenizer):
        real = cls.from_pretrained

        def recording(source, *args, _real=real, **kwargs):
            seen.append(kwargs)
            return _real(source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    overrides = {**tiny_overrides, "model": str(model_folders["llama"])}
    cfg = config.load_config(overrides={**overrides, "model_revision": "main", "attn_implementation": "eager"})
    models.build_model(cfg, 3, models.load_tokenizer(cfg)[0].pad_token_id)
    assert all(k["revision"] == "main" and k["trust_remote_code"] is False for k in seen) and len(seen) >= 2
    assert seen[-1]["attn_implementation"] == "eager"


@pytest.mark.parametrize(
    "extra, said",
    [
        ({"model_revision": "v1"}, "model_revision: applies to a Hugging Face model given by id or folder"),
        ({"trust_remote_code": True}, "trust_remote_code: applies to a Hugging Face model"),
        ({"attn_implementation": "sdpa"}, "attn_implementation: applies to a Hugging Face model"),
        ({"model": "LLAMA", "attn_implementation": "flash_attention_2"}, "flash_attention_2 needs a CUDA device"),
        (
            {"model": "tiny-efficientnet", "dataset": "fashion_mnist", "gradient_checkpointing": True},
            "not a transformers",
        ),
    ],
)
def test_hub_options_are_refused_where_they_mean_nothing(model_folders, tiny_overrides, extra, said):
    if extra.get("model") == "LLAMA":
        extra = {**extra, "model": str(model_folders["llama"])}
    with pytest.raises(config.ConfigError, match=said):
        config.load_config(overrides={**tiny_overrides, **extra})


def test_a_saved_image_model_folder_trains_and_its_adapter_rescores(tmp_path):
    """A ViT folder (no tokenizer: an image model's config describes pixels) on CIFAR-10's layout."""
    import task_fixtures
    from transformers import ViTConfig, ViTModel

    task_fixtures.cifar10(tmp_path, per_batch=6, n_test=6)
    folder = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, image_size=224, patch_size=32, **SMALL)).save_pretrained(
        folder
    )
    overrides = image_overrides(tmp_path, "cifar10", str(folder))
    argv = argv_of(overrides)
    assert train_lora.main(argv) == 0
    run_dir = tmp_path / "runs" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert reloaded_test_metrics(run_dir)["accuracy"] == summary["test_accuracy"]
    model = models.load_trained(
        config.from_mapping(config.yaml_load((run_dir / "config.yaml").read_text())), run_dir / "adapter", 10, None
    )
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    # peft has no default for ViT: every linear layer outside the head
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, lora


def test_a_hub_id_reads_model_path_and_says_how_to_go_offline(model_folders, tiny_overrides, capsys, monkeypatch):
    """A hub id names the model; its weights come from model_path (a copy made where there is a
    network). Without either, one line names the id, --model-path and HF_HUB_OFFLINE."""
    from transformers import AutoConfig

    overrides = {**tiny_overrides, "model": "meta-llama/Tiny-Llama", "model_path": str(model_folders["llama"])}
    fed = train_lora.build(config.load_config(overrides=overrides), torch.device("cpu"))
    assert type(fed.model.base_model.model).__name__ == "LlamaForSequenceClassification"

    def offline(source, *args, **kwargs):  # what from_pretrained raises with no network and no cache
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {source}")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    argv = argv_of({k: v for k, v in tiny_overrides.items() if k != "model"})
    assert train_lora.main([*argv, "--model", "Qwen/Qwen2.5-0.5B"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model: Qwen/Qwen2.5-0.5B could not be fetched"), err
    assert "--model-path" in err[0] and "HF_HUB_OFFLINE=1" in err[0]


def test_model_path_beside_a_model_folder_is_refused(model_folders, tiny_overrides):
    overrides = {**tiny_overrides, "model": str(model_folders["llama"]), "model_path": str(model_folders["qwen2"])}
    with pytest.raises(config.ConfigError, match="model_path: model .* is a folder, which names its own weights"):
        config.load_config(overrides=overrides)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_stacks_quantizes_and_takes_dora_in_product_space(model_folders, tiny_overrides, arch):
    """What docs/data-and-models.md's table of architectures says each supports: clients trained
    together get the updates they get alone on a 4-bit base (peft's bitsandbytes LoRA layers
    routed), and DoRA trains its magnitudes through a product-space merge."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    base = {**tiny_overrides, "model": str(model_folders[arch]), "lora_dropout": 0.0, "base_dropout": False}
    fed = train_lora.build(config.load_config(overrides={**base, "quantization": "4bit"}), torch.device("cpu"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in fed.model.modules())
    jobs = fed.plan_round(0).jobs
    alone = [fed.worker.train_job(0, job)[0] for job in jobs]
    together = [update for update, _ in fed.worker.train_together(0, jobs)]
    for job, a, b in zip(jobs, alone, together):
        assert float((a - job.start).abs().max()) > 1e-4  # it trained
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    fed = train_lora.build(
        config.load_config(overrides={**base, "use_dora": True, "merge_space": "product"}), torch.device("cpu")
    )
    magnitudes = [n for n in fed.flat.names if "lora_magnitude_vector" in n]
    start = fed.server.detach().clone()
    fed.run_round(0)
    moved = fed.flat.named(fed.server - start)
    assert magnitudes and all(float(moved[n].abs().max()) > 0 for n in magnitudes)
