import pytest
import torch

import config
from flasc import models
from flasc.models import build, catalog


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def cfg_with(**kw):
    base = {"dataset": "toy", "model": "tiny-bert", "lora_rank": 4, "lora_alpha": 8}
    return config.load_config(overrides={**base, **kw})


def test_lora_trains_adapters_and_head_only():
    names = trainable_names(models.build_model(cfg_with(), 3, 0))
    assert names and all(("lora_" in n) or ("classifier" in n) for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("query" in n for n in names) and any("value" in n for n in names)


def test_freeze_a_leaves_only_b_and_head():
    names = trainable_names(models.build_model(cfg_with(freeze_a=True), 3, 0))
    assert not any("lora_A" in n for n in names) and any("lora_B" in n for n in names)


def test_rank_zero_trains_the_head_only():
    model = models.build_model(cfg_with(lora_rank=0), 3, 0)
    assert sorted(trainable_names(model)) == ["classifier.bias", "classifier.weight"]


def test_rank_minus_one_trains_everything():
    model = models.build_model(cfg_with(lora_rank=-1), 3, 0)
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_same_model_different_seed_different_head():
    a = models.build_model(cfg_with(seed=1), 3, 0).state_dict()
    b = models.build_model(cfg_with(seed=1), 3, 0).state_dict()
    c = models.build_model(cfg_with(seed=2), 3, 0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name, target", [("tiny-bert", "query"), ("tiny-gpt2", "c_attn")])
def test_both_families_forward_with_adapters(name, target):
    cfg = cfg_with(model=name)
    tok, _ = models.load_tokenizer(cfg)
    model = models.build_model(cfg, 3, tok.pad_token_id)
    assert any(target in n and "lora_A" in n for n in trainable_names(model))
    enc = tok(["a short text", "another longer text here"], padding=True, return_tensors="pt")
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape == (2, 3)


def test_missing_hub_model_is_a_clear_error(tmp_path):
    cfg = cfg_with(model="gpt2", model_path=str(tmp_path / "nothing-here"))
    with pytest.raises(models.ModelUnavailable, match="--model-path"):
        models.load_tokenizer(cfg)


def test_bf16_option_runs_the_forward_in_bfloat16():
    from flasc.tasks.evaluation import logits_of

    cfg = cfg_with()
    model = models.build_model(cfg, 3, 0)
    seen = []
    model.base_model.model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert logits_of(model, batch, torch.device("cpu"), bf16=True).dtype == torch.float32
    logits_of(model, batch, torch.device("cpu"), bf16=False)
    assert seen == [torch.bfloat16, torch.float32]


def _efficientnet(**kw):
    return cfg_with(dataset="fashion_mnist", model="tiny-efficientnet", **kw)


def test_plain_pointwise_convs_compute_the_same_function():
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name(
        "efficientnet-lite0", num_classes=4, image_size=64, width_coefficient=0.25, depth_coefficient=0.2
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    before = net(x)
    build._plain_pointwise_convs(net)
    assert all(
        type(m) is torch.nn.Conv2d for n, m in net.named_modules() if n.endswith(("_expand_conv", "_project_conv"))
    )
    assert torch.allclose(net(x), before, atol=1e-6)


def test_efficientnet_lora_on_expand_and_project_convs_and_head():
    model = models.build_model(_efficientnet(), 10, None)
    names = trainable_names(model)
    assert any("_expand_conv.lora_A" in n for n in names) and any("_project_conv.lora_B" in n for n in names)
    assert all("lora_" in n or "_fc" in n for n in names)
    out = model(pixel_values=torch.randn(2, 3, 64, 64)).logits
    assert out.shape == (2, 10)


def test_efficientnet_batchnorm_statistics_stay_fixed_in_training():
    model = models.build_model(_efficientnet(), 10, None)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(pixel_values=torch.randn(4, 3, 64, 64) * 3 + 1).logits.sum().backward()
    opt.step()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_pretrained_efficientnet_loads_the_shipped_imagenet_weights():
    cfg = cfg_with(dataset="fashion_mnist", model="efficientnet-lite0", lora_rank=0)
    model = models.build_model(cfg, 10, None)
    state = torch.load(catalog.efficientnet_weights(), weights_only=True)
    net = model.net
    assert torch.equal(net._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(net._blocks[3]._project_conv.weight, state["_blocks.3._project_conv.weight"])
    assert net._fc.out_features == 10
