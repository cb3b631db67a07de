"""One Config: documented defaults, a configs/NAME.yaml overlay, command-line overrides, validation.

Defaults live in configs/basic_config.yaml (with a comment each); this module knows each option's
type and allowed values (SCHEMA) and the rules between options that belong to no one component.
The combinations a component refuses are its own: `components(cfg)` lists the parts a config
selects (data set, model family, merge space and strategy, server optimizer, privacy, tiers,
shadows, algorithm, local training, stacked clients), each declaring the options it reads and
checking itself. Everything is checked before any work starts, and every problem is reported as one
ConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flasc.options import Config, ConfigError, dump, read_text, yaml_load, yaml_value  # noqa: F401  (config.X for callers)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASIC = "basic_config"


@dataclass(frozen=True)
class Option:
    kind: type  # bool, int, float, str, list (of names) or dict (names -> names)
    check: Callable[[Any], bool] | None = None  # extra constraint on the typed value
    allowed: str | Callable[[], str] = ""  # words for the error message (or what makes them, when asked)
    nullable: bool = False
    registry: bool = False  # check reads a registry of components (which imports torch)
    lists: str = ""  # dict: its values are lists of names, and a bare list (or name) is this key's


def _choice(*names: str) -> Option:
    return Option(str, lambda v: v in names, "one of " + ", ".join(names))


def _registry_choice(registry_getter: Callable[[], list[str]], extra: tuple[str, ...] = ()) -> Option:
    # Registries are read when a value is checked, so that importing config.py imports no component.
    names = lambda: (*extra, *registry_getter())  # noqa: E731
    return Option(str, lambda v: v in names(), lambda: "one of " + ", ".join(names()), registry=True)


def _datasets() -> list[str]:
    from data import DATASETS

    return sorted(DATASETS)


def _models() -> list[str]:
    from flasc.models import MODELS

    return sorted(MODELS)


def _hub_model(name: str) -> bool:
    from flasc.models.catalog import is_hub_model

    return is_hub_model(name)


def _server_opts() -> list[str]:
    from flasc.federation.optimizers import SERVER_OPTIMIZERS

    return sorted(SERVER_OPTIMIZERS)


def _strategies() -> list[str]:
    from merging import STRATEGIES

    return sorted(STRATEGIES)


def _client_opts() -> list[str]:
    from flasc.client.optimizers import CLIENT_OPTIMIZERS

    return sorted(CLIENT_OPTIMIZERS)


def _algorithms() -> list[str]:
    from flasc.algorithms import ALGORITHMS

    return list(ALGORITHMS)


_positive = Option(float, lambda v: v > 0, "a number > 0")
_density = Option(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_pos_int = Option(int, lambda v: v >= 1, "an integer >= 1")
_nonneg_int = Option(int, lambda v: v >= 0, "an integer >= 0")

SCHEMA: dict[str, Option] = {
    "dir": Option(str, lambda v: v != "", "a non-empty path"),
    "name": Option(str, lambda v: v not in ("", ".", "..") and "/" not in v, "a non-empty folder name without '/'"),
    "seed": _nonneg_int,
    "gpu": Option(str, lambda v: v in ("auto", "cpu") or v.isdigit(), "auto, cpu or a CUDA device index such as 0"),
    "bf16": Option(bool),
    "deterministic": Option(bool),
    "dataset": _registry_choice(_datasets),
    "data_dir": Option(str, lambda v: v != "", "a non-empty path"),
    "max_length": Option(
        int, lambda v: v == 0 or 8 <= v <= 1 << 20, "0 (dataset default) or an integer >= 8 (up to the model's context)"
    ),
    "clients": Option(int, lambda v: v >= 0, "an integer >= 0 (0: every user, with a natural partition)"),
    "partition": _choice("auto", "natural", "dirichlet", "iid"),
    "iid_alpha": _positive,
    "min_client_size": _nonneg_int,
    "iid_mix": Option(float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0: natural clients, 1: IID)"),
    "augment": Option(bool),
    "hf_dataset": Option(str, lambda v: v != "", "a Hugging Face dataset id (org/name) or null", nullable=True),
    "hf_dataset_config": Option(
        str, lambda v: v != "", "the data set's configuration (subset) name or null", nullable=True
    ),
    "data_files": Option(
        dict,
        lambda v: set(v) <= {"train", "validation", "test"},
        "null, a file or list of files (training examples), or a mapping of train, validation, test to files",
        nullable=True,
        lists="train",
    ),
    "data_format": _choice("auto", "alpaca", "messages", "prompt_response"),
    "columns": Option(dict, None, "a mapping of record fields to your column names, e.g. {output: response}"),
    "val_fraction": Option(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "test_fraction": Option(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "train_examples": Option(int, lambda v: v >= 0, "an integer >= 0 (0: all the training examples)"),
    "model": Option(
        str,
        lambda v: v in ("auto", *_models()) or _hub_model(v),
        lambda: f"auto, one of {', '.join(_models())}, a Hugging Face model id (org/name) or a model folder",
        registry=True,
    ),
    "model_path": Option(str, lambda v: v != "", "a folder path or null", nullable=True),
    "lora_rank": Option(int, lambda v: v >= -1, "an integer >= -1 (0: head only, -1: full fine-tuning)"),
    "lora_alpha": _positive,
    "lora_dropout": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model_revision": Option(
        str, lambda v: v != "", "a branch, tag or commit of the hub model, or null", nullable=True
    ),
    "trust_remote_code": Option(bool),
    "attn_implementation": _choice("auto", "sdpa", "eager", "flash_attention_2"),
    "gradient_checkpointing": Option(bool),
    "lora_target_modules": Option(
        list,
        lambda v: len(v) > 0 and all(x.strip() for x in v),
        "null (the model's own), a list of module names, all-linear, or one regular expression",
        nullable=True,
    ),
    "torch_dtype": _choice("float32", "bfloat16", "float16"),
    "quantization": _choice("none", "8bit", "4bit"),
    "bnb_4bit_quant_type": _choice("nf4", "fp4"),
    "bnb_4bit_double_quant": Option(bool),
    "bnb_4bit_compute_dtype": _choice("auto", "float32", "bfloat16", "float16"),
    "use_dora": Option(bool),
    "use_rslora": Option(bool),
    "init_lora_weights": Option(
        str,
        lambda v: v in ("default", "gaussian", "orthogonal", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", v),
        "one of default, gaussian, orthogonal, pissa, pissa_niter_N (N an integer), olora",
    ),
    "lora_plus_ratio": Option(float, lambda v: v > 0, "a number > 0 (1: plain LoRA)"),
    "freeze_a": Option(bool),
    "base_dropout": Option(bool),
    "server_rounds": _nonneg_int,
    "server_batch": _pos_int,
    "server_opt": _registry_choice(_server_opts),
    "server_lr": _positive,
    "client_opt": _registry_choice(_client_opts),
    "client_lr": _positive,
    "client_batch": _pos_int,
    "client_epochs": _pos_int,
    "client_steps": Option(int, lambda v: v >= 0, "an integer >= 0 (0: client_epochs passes)"),
    "grad_accum": _pos_int,
    "max_grad_norm": Option(float, lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "client_schedule": _choice("constant", "cosine"),
    "client_lr_min": Option(float, lambda v: v >= 0, "a number >= 0"),
    "client_momentum": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "client_beta1": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "client_beta2": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "client_eps": _positive,
    "client_weight_decay": Option(float, lambda v: v >= 0, "a number >= 0"),
    "client_parallelism": _pos_int,
    "algorithm": _registry_choice(_algorithms),
    "local_head": Option(bool),
    "hetlora_prune": Option(bool),
    "hetlora_gamma": Option(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "fedsvd_period": _pos_int,
    "fedsb_init_examples": _pos_int,
    "fedsb_init_data": _choice("validation", "clients"),
    "fedsb_init_lr": _positive,
    "flexlora_split": _choice("b", "balanced"),
    "lorafair_lambda": Option(float, lambda v: v >= 0, "a number >= 0"),
    "hetlora_lambda": Option(float, lambda v: v >= 0, "a number >= 0"),
    "merging_strategy": _registry_choice(_strategies),
    "merge_space": _choice("factors", "product"),
    "weighting": _choice("uniform", "num_examples"),
    "scaling_coefficient": _positive,
    "density": _density,
    "ties_scope": _choice("tensor", "global"),
    "drop_rate": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "fisher_examples": _pos_int,
    "regmean_examples": _pos_int,
    "regmean_alpha": Option(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "beta1": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "beta2": Option(
        float, lambda v: 0 <= v < 1, "a number in [0, 1) or null (the server optimizer's default)", nullable=True
    ),
    "tau": Option(float, lambda v: v > 0, "a number > 0 or null (the server optimizer's default)", nullable=True),
    "weight_decay": Option(
        float, lambda v: v >= 0, "a number >= 0 or null (0.01 with server_opt adamw)", nullable=True
    ),
    "server_schedule": _choice("constant", "cosine"),
    "mu": Option(float, lambda v: v >= 0, "a number >= 0"),
    "early_stopping": Option(float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0: off)"),
    "diverged_clients": _choice("stop", "skip"),
    "dl_density": _density,
    "ul_density": _density,
    "dl_density_decay": _density,
    "ul_density_decay": _density,
    "decay_freq": _pos_int,
    "server_freeze": Option(bool),
    "client_freeze": Option(bool),
    "l2_clip_norm": Option(float, lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "noise_multiplier": Option(float, lambda v: v >= 0, "a number >= 0 (0: no noise)"),
    "dp_delta": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1) (0: 1 / clients)"),
    "dp_divide_by_clip": Option(bool),
    "tiers": _pos_int,
    "syshet": _choice("rank", "rankl1", "density"),
    "tier_assignment": _choice("mod", "random"),
    "ckpt_freq": _nonneg_int,
    "dist_timeout": _positive,
    "eval_freq": _pos_int,
    "eval_masked": Option(bool),
    "eval_batch": _pos_int,
    "eval_personalized": Option(bool),
    "local_test_fraction": Option(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "target_accuracy": Option(
        float, lambda v: v >= 0, "a number >= 0 (a value of the primary metric) or null", nullable=True
    ),
    "drift_stats": Option(bool),
    "shadow_strategies": Option(
        list,
        lambda v: all(_is_shadow(x) for x in v),
        "a list of names that merging_strategy accepts, each alone or as NAME@factors / NAME@product",
    ),
    "llm_tasks": Option(list, None, "a list of scoring-task files (.jsonl, .json, .csv, .parquet or .yaml)"),
    "llm_task_freq": _nonneg_int,
    "shadow_freq": _pos_int,
    "shadow_eval_examples": _nonneg_int,
}


def _is_shadow(entry: str) -> bool:
    name, _, space = entry.partition("@")
    return name in _strategies() and space in ("", "factors", "product")


# configs/DIR/NAME.yaml, --config DIR/NAME: paper/ the FLASC code's exact settings; flowertune/,
# openfedllm/ and fsllm/ the LLM setups of FlowerTune, OpenFedLLM and FederatedScope-LLM
PRESET_DIRS = ("paper", "flowertune", "openfedllm", "fsllm")


def list_configs() -> list[str]:
    """Every name --config accepts: configs/NAME.yaml, then the presets as DIR/NAME."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) + [
        f"{d}/{p.stem}" for d in PRESET_DIRS for p in sorted((CONFIG_DIR / d).glob("*.yaml"))
    ]


def describe_config(name: str) -> str:
    """The first sentence of the comment that opens configs/NAME.yaml (what the config is)."""
    words = []
    for line in read_text(CONFIG_DIR / f"{name}.yaml").splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    text = " ".join(words)
    return re.split(r"(?<!\bal)\.\s", text, maxsplit=1)[0].rstrip(".") + "." if text else ""  # not at "et al. "


def is_config_path(name: str) -> bool:
    """--config takes a name from configs/ or the path of a YAML file of one's own."""
    return name.endswith((".yaml", ".yml"))


def config_file(name: str, relative_to: Path | None = None) -> Path:
    """The file of --config NAME: configs/NAME.yaml, or a .yaml path (relative paths from the current
    folder, or inside a config file from that file's folder)."""
    if is_config_path(name):
        path = Path(name).expanduser()
        return path if path.is_absolute() or relative_to is None else relative_to / path
    return CONFIG_DIR / f"{name}.yaml"


def _config_layers(name: str, chain: tuple[tuple[str, Path], ...] = ()) -> list[tuple[str, dict]]:
    """A config file as a layer, after the layers of the config it names in `extends:`.
    chain: (label, resolved path) of the files that extend this one, innermost last."""
    where = f"{chain[-1][0]}: extends" if chain else "--config"
    path = config_file(name, chain[-1][1].parent if chain else None)
    if is_config_path(name):
        if not path.is_file():
            raise ConfigError(
                f"{where}: no file {path}; expected a config name ({', '.join(list_configs())}) "
                "or the path of a .yaml file"
            )
    elif name not in list_configs():
        raise ConfigError(
            f"{where}: no config named '{name}'; available: {', '.join(list_configs())}, or the path of a .yaml file"
        )
    if path.resolve() in [p for _, p in chain]:
        raise ConfigError(f"{chain[-1][0]}: extends {name}, which extends it back; expected a chain without cycles")
    values = _read_yaml(path)
    parent = values.pop("extends", None)
    label = str(path) if is_config_path(name) else f"configs/{name}.yaml"
    layer = (label, values)
    return [layer] if parent is None else [*_config_layers(str(parent), (*chain, (label, path.resolve()))), layer]


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml_load(read_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of option: value")
    return data


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, SCHEMA, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown option '{key}' in {where}{hint}; options are documented in configs/{BASIC}.yaml")


def coerce(key: str, value: Any, registries: bool = True) -> Any:
    """Type-check one value; ints are accepted where floats are expected. registries: False leaves
    out the checks against the registries of components (names of data sets, models, strategies)."""
    opt = SCHEMA[key]
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(f"{key}: null is not allowed; expected {_describe(opt)}")
    ok = False
    if opt.kind is bool:
        ok = isinstance(value, bool)
    elif opt.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif opt.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            value = float(value)
    elif opt.kind is str:
        # Numbers are fine as names and device indices (gpu: 0); keep them as text.
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        if ok:
            value = str(value)
    elif opt.kind is list:  # a list of names; one name alone is a list of one
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    elif opt.kind is dict:
        ok, value = _mapping(value, opt.lists)
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not valid; expected {_describe(opt)}")
    if opt.registry and not registries:
        return value
    if opt.kind is list and opt.check is not None:
        bad = [x for x in value if not opt.check([x])]
        if bad:
            raise ConfigError(f"{key}: {bad[0]!r} is not valid; expected {_describe(opt)}")
    if opt.check is not None and not opt.check(value):
        raise ConfigError(f"{key}: {value!r} is out of range; expected {_describe(opt)}")
    return value


def _mapping(value: Any, lists: str) -> tuple[bool, Any]:
    """(whether it is a mapping of names to names, the mapping); with `lists`, to lists of names,
    and a name or a list alone is the value of key `lists`."""
    if lists and (isinstance(value, str) or isinstance(value, list)):
        value = {lists: value}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return False, value
    if lists:
        value = {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in value.values()), value
    return all(isinstance(v, str) and v for v in value.values()), value


def _describe(opt: Option) -> str:
    if opt.allowed:
        return opt.allowed() if callable(opt.allowed) else opt.allowed
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a mapping",
    }[opt.kind]


def resolved_partition(cfg) -> str:
    """The partition a run uses (auto resolved for its data set: data/__init__.py)."""
    from data import resolved_partition

    return resolved_partition(cfg)


def components(cfg: Config) -> list:
    """The parts of flasc this config selects, each with the options it reads (`options`) and a
    `check(cfg)` for the combinations it refuses: the data set, the model family, the merge space
    and strategy, privacy, heterogeneity tiers, the algorithm, stacked clients, shadows."""
    import merging
    from data import DATASETS
    from flasc.algorithms import ALGORITHMS
    from flasc.client import local, stacked
    from flasc.diagnostics import shadows
    from flasc.federation import optimizers, privacy, tiers
    from flasc.models import spec_of
    from flasc.tasks import llm_eval

    class Shadows:  # shadows check each entry as a whole run, with this module's checks
        options = shadows.options

        @staticmethod
        def check(c):
            shadows.check(c, _check_together)

    return [
        spec_of(cfg),
        DATASETS[cfg.dataset],
        merging.SPACES[cfg.merge_space],
        merging.STRATEGIES[cfg.merging_strategy],
        optimizers,
        privacy,
        tiers,
        Shadows,
        ALGORITHMS[cfg.algorithm],
        local,
        stacked,
        llm_eval,
    ]


def _check_together(cfg: Config) -> None:
    """Constraints between options: the generic ones here, then every selected component's own."""
    if cfg.clients and cfg.server_batch > cfg.clients:
        raise ConfigError(
            f"server_batch: {cfg.server_batch} clients per round is more than "
            f"clients ({cfg.clients}); expected at most {cfg.clients}"
        )
    for component in components(cfg):
        if hasattr(component, "check"):
            component.check(cfg)


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config's NAME or path, the other arguments)."""
    name, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            previous = name
            if "=" in argv[i]:
                name = argv[i].split("=", 1)[1]
            elif i + 1 < len(argv):
                name, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a name; see --list-configs")
            if previous is not None:  # configs do not combine on the command line: say so
                raise ConfigError(
                    f"--config: given twice ({previous}, then {name}); expected one config (a config "
                    "file can build on another with extends: NAME)"
                )
        else:
            rest.append(argv[i])
        i += 1
    return name, rest


def parse_overrides(argv: list[str], repeated: list[str] | None = None) -> dict[str, Any]:
    """'--client-lr 0.1' / '--client_lr=0.1' -> {'client_lr': 0.1}; values parsed as YAML scalars.
    An option given twice takes its last value, as command lines built by appending overrides
    expect; `repeated` (when given) collects a line saying so for each, for the caller to print."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; options look like --option-name value")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key.replace('_', '-')} needs a value")
            raw = argv[i + 1]
            i += 1
        if key not in SCHEMA:
            raise _unknown(key, "the command line")
        try:
            value = yaml_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if key in overrides and repeated is not None:
            repeated.append(
                f"--{key.replace('_', '-')} is given more than once ({yaml_value(overrides[key])}, then "
                f"{yaml_value(value)}); the last value is used"
            )
        overrides[key] = value
        i += 1
    return overrides


def _dataset_defaults(dataset: Any) -> tuple[str, dict] | None:
    """configs/datasets/DATASET.yaml: the data set's own defaults (say, a learning rate its model
    needs), layered over basic_config.yaml and under the chosen config and the command line."""
    path = CONFIG_DIR / "datasets" / f"{dataset}.yaml"
    if not isinstance(dataset, str) or not path.is_file():
        return None
    return f"configs/datasets/{dataset}.yaml", _read_yaml(path)


def load_config(name: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """basic_config.yaml <- configs/datasets/DATASET.yaml <- configs/NAME.yaml (after the configs
    it extends) <- overrides, validated."""
    values = _option_values(name, overrides)
    from flasc.federation.optimizers import resolve_defaults  # (imports torch: after the options' own checks)

    cfg = Config(resolve_defaults(values))
    _check_together(cfg)
    return cfg


def check_options(argv: list[str]) -> None:
    """The checks of train_lora.py's options that need no part of flasc (unknown options, values of
    the wrong type or range, config files): a typo is refused before torch is imported. Names
    checked against a registry of components (data sets, models, strategies...) and the
    combinations (components' checks) are checked after it, by load_config."""
    if any(a in ("-h", "--help", "--list-configs") or a.startswith("--resume") for a in argv):
        return
    name, rest = split_config_arg(argv)
    _option_values(name, parse_overrides(rest), registries=False)


def refuse_bad_options(argv: list[str]) -> None:
    """train_lora.py's first step, before it imports torch: exit with the bad-input line and status
    2 (said by rank 0 alone under torchrun) if check_options refuses the command line."""
    import os
    import sys

    from flasc.runtime.tracking import EXIT_CODE

    try:
        check_options(argv)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CODE["bad_input"])


def _option_values(name: str | None, overrides: dict[str, Any] | None, registries: bool = True) -> dict[str, Any]:
    """Every option's value from the layers, each checked on its own (registries: see coerce)."""
    values = _read_yaml(CONFIG_DIR / f"{BASIC}.yaml")
    missing = set(SCHEMA) - set(values)
    if missing:  # a development error, but say it plainly
        raise ConfigError(f"configs/{BASIC}.yaml lacks defaults for: {', '.join(sorted(missing))}")
    layers: list[tuple[str, dict]] = []
    if name is not None and name != BASIC:
        layers.extend(_config_layers(name))
    layers.append(("the command line", dict(overrides or {})))
    dataset = values.get("dataset")
    for _, layer in layers:
        dataset = layer.get("dataset", dataset)
    per_dataset = _dataset_defaults(dataset)
    if per_dataset is not None:
        if "dataset" in per_dataset[1]:
            raise ConfigError(f"{per_dataset[0]}: a data set's defaults cannot choose the data set")
        layers.insert(0, per_dataset)
    for where, layer in layers:
        for key, value in layer.items():
            if key not in SCHEMA:
                raise _unknown(str(key), where)
            values[key] = value
    return {key: coerce(key, values[key], registries) for key in SCHEMA}


def from_mapping(values: dict[str, Any]) -> Config:
    """Validate a complete mapping (e.g. a saved run's config.yaml)."""
    for key in values:
        if key not in SCHEMA:
            raise _unknown(str(key), "the saved config")
    return load_config(overrides=values)
