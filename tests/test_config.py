import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

import config
from config import ConfigError, load_config, parse_overrides


def test_basic_config_documents_every_option():
    text = (ROOT / "configs" / "basic_config.yaml").read_text()
    assert set(yaml.safe_load(text)) == set(config.SCHEMA)
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            assert "#" in line, f"option without a comment: {line}"


def test_every_shipped_config_is_valid(model_folders):
    for name in config.list_configs():
        # the LLM presets name hub models: here a local copy of a tiny one stands for each
        llm = name.split("/")[0] in ("flowertune", "openfedllm", "fsllm")
        load_config(name, {"model_path": str(model_folders["llama"])} if llm else None)
    assert {"fedavg", "flasc"} <= set(config.list_configs())


def test_layers_override_in_order():
    base = load_config()
    assert base.dl_density == 1.0
    flasc = load_config("flasc")
    assert flasc.dl_density == 0.25 and flasc.ul_density == 0.25
    cli = load_config("flasc", parse_overrides(["--dl-density", "0.5", "--client_lr=0.2", "--name", "x"]))
    assert (cli.dl_density, cli.ul_density, cli.client_lr, cli.name) == (0.5, 0.25, 0.2, "x")


def test_values_are_typed():
    cfg = load_config(
        overrides=parse_overrides(
            [
                "--server-rounds",
                "7",
                "--server-lr",
                "1",
                "--gpu",
                "0",
                "--server-freeze",
                "true",
                "--model-path",
                "null",
            ]
        )
    )
    assert cfg.server_rounds == 7 and isinstance(cfg.server_lr, float) and cfg.gpu == "0"
    assert cfg.server_freeze is True and cfg.model_path is None


@pytest.mark.parametrize(
    "args, words",
    [
        (["--no-such-option", "1"], ["no_such_option", "basic_config.yaml"]),
        (["--dl-densty", "0.5"], ["dl_densty", "did you mean dl_density"]),
        (["--dl-density", "1.5"], ["dl_density", "(0, 1]"]),
        (["--ul-density", "0"], ["ul_density", "(0, 1]"]),
        (["--client-lr", "-0.1"], ["client_lr", "> 0"]),
        (["--server-lr", "abc"], ["server_lr", "a number > 0"]),
        (["--server-rounds", "2.5"], ["server_rounds", "integer"]),
        (["--server-batch", "50", "--clients", "10"], ["server_batch", "at most 10"]),
        (["--server-opt", "adamax"], ["server_opt", "one of", "sgd"]),
        (["--client-opt", "rmsprop"], ["client_opt", "one of", "adam"]),
        (["--dataset", "mnist"], ["dataset", "bbcnews"]),
        (["--model", "bert-huge"], ["model", "minilm"]),
        (["--partition", "shards"], ["partition", "dirichlet"]),
        (["--lora-rank", "-2"], ["lora_rank", ">= -1"]),
        (["--freeze-a", "true", "--lora-rank", "0"], ["freeze_a", "lora_rank"]),
        (["--eval-masked", "maybe"], ["eval_masked", "true or false"]),
        (["--gpu", "cuda9"], ["gpu", "auto"]),
        (["--decay-freq", "0"], ["decay_freq", ">= 1"]),
        (["--iid-alpha", "0"], ["iid_alpha", "> 0"]),
        (["--name", "a/b"], ["name", "without '/'"]),
        (["--seed"], ["--seed needs a value"]),
        (["stray"], ["unexpected argument 'stray'"]),
        # what fits which task
        (["--dataset", "fashion_mnist", "--model", "minilm"], ["model", "minilm", "image input", "efficientnet-lite0"]),
        (["--dataset", "bbcnews", "--model", "vit"], ["model", "vit", "text input"]),
        (["--dataset", "reddit", "--model", "minilm"], ["model", "language model", "gpt2"]),
        (["--partition", "natural"], ["partition", "natural", "bbcnews has no users"]),
        (["--dataset", "flair", "--partition", "dirichlet"], ["partition", "dirichlet", "multi-label"]),
        (["--clients", "0"], ["clients", "0", "natural partition"]),
        (["--dataset", "cifar10", "--max-length", "64"], ["max_length", "images"]),
        (["--dataset", "reddit", "--lora-rank", "0"], ["lora_rank", "language modelling"]),
        (["--dataset", "reddit", "--merging-strategy", "fisher"], ["merging_strategy", "fisher", "vocabulary"]),
        (["--dataset", "fashion_mnist", "--merge-space", "product"], ["merge_space", "product", "convolutions"]),
        (
            ["--dataset", "fashion_mnist", "--merging-strategy", "regmean"],
            ["merging_strategy", "regmean", "convolutions"],
        ),
    ],
)
def test_rejections_name_the_key(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=parse_overrides(args))
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "basic_config.yaml").write_text((ROOT / "configs" / "basic_config.yaml").read_text())
    (tmp_path / "bad.yaml").write_text("client_lr: 0.1\nclient_lrr: 0.2\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"client_lrr.*configs/bad.yaml"):
        load_config("bad")


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"no config named 'nope'.*fedavg"):
        load_config("nope")


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "train_lora.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args", [["--dl-density", "1.5"], ["--config", "nope"], ["--server-batch", "30"], ["--bogus", "1"]]
)
@pytest.mark.slow
def test_cli_bad_input_is_one_clear_line(args, tmp_path):
    proc = run_cli(*args, "--dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_cli_lists_every_config_file_with_its_description(capsys):
    """Every configs/**/*.yaml but the data sets' defaults, by its name, with its first comment."""
    import train_lora

    assert train_lora.main(["--list-configs"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    files = [p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "datasets"]
    assert set(listed) == {str(p.relative_to(ROOT / "configs").with_suffix("")) for p in files}
    assert "FedAvg with dense LoRA" in listed["fedavg"] and "RoLoRA" in listed["rolora"]


def test_dataset_defaults_sit_between_basic_config_and_the_chosen_config(tmp_path, monkeypatch):
    basic = load_config("fedavg")
    fm = load_config("fedavg", {"dataset": "fashion_mnist"})
    assert fm.client_lr == 0.005 != basic.client_lr  # configs/datasets/fashion_mnist.yaml
    assert load_config("fedavg", {"dataset": "fashion_mnist", "client_lr": 0.2}).client_lr == 0.2
    assert load_config("fedavg", {"dataset": "bbcnews"}).client_lr == basic.client_lr
    # a config file that sets the option wins over the data set's default
    configs = tmp_path / "configs"
    (configs / "datasets").mkdir(parents=True)
    for f in ("basic_config.yaml",):
        (configs / f).write_text((ROOT / "configs" / f).read_text())
    (configs / "datasets" / "fashion_mnist.yaml").write_text("client_lr: 0.005\nclient_batch: 32\n")
    (configs / "mine.yaml").write_text("client_lr: 0.3\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)
    cfg = load_config("mine", {"dataset": "fashion_mnist"})
    assert (cfg.client_lr, cfg.client_batch) == (0.3, 32)
    (configs / "datasets" / "fashion_mnist.yaml").write_text("dataset: bbcnews\n")
    with pytest.raises(ConfigError, match="cannot choose the data set"):
        load_config("mine", {"dataset": "fashion_mnist"})


def test_partition_auto_is_natural_only_where_the_dataset_has_users():
    assert config.resolved_partition(load_config(overrides={"dataset": "flair"})) == "natural"
    assert config.resolved_partition(load_config(overrides={"dataset": "reddit", "clients": 0})) == "natural"
    assert config.resolved_partition(load_config(overrides={"dataset": "cifar10"})) == "dirichlet"
    assert config.resolved_partition(load_config(overrides={"dataset": "flair", "partition": "iid"})) == "iid"


def test_an_option_given_twice_takes_its_last_value_with_a_warning(capsys):
    """Command lines built by appending overrides (scripts, studies) expect the last value to win;
    the run says so in one line per repeated option."""
    import train_lora

    repeated = []
    assert parse_overrides(["--client-lr", "0.1", "--seed", "3", "--client_lr=0.2"], repeated) == {
        "client_lr": 0.2,
        "seed": 3,
    }
    assert repeated == ["--client-lr is given more than once (0.1, then 0.2); the last value is used"]
    cfg = train_lora.parse_cli(["--client-lr", "0.1", "--client-lr", "0.2"])
    assert cfg.client_lr == 0.2
    assert capsys.readouterr().err.splitlines() == [
        "warning: --client-lr is given more than once (0.1, then 0.2); the last value is used"
    ]


def test_two_configs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^--config: given twice \(fedavg, then flasc\); expected one config"):
        config.split_config_arg(["--config", "fedavg", "--seed", "1", "--config=flasc"])
