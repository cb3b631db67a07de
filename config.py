"""One Config: documented defaults, a configs/NAME.yaml overlay, command-line overrides, validation.

Defaults live in configs/basic_config.yaml (with a comment each); this module knows only each
option's type and allowed values. Everything is checked before any work starts, and every
problem is reported as one ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASIC = "basic_config"


class ConfigError(ValueError):
    """Bad configuration: the message names the key and what is allowed."""


class _Loader(yaml.SafeLoader):
    """YAML with numbers as people write them: 1e-3, 5E-4 and 1e5 are floats. (YAML 1.1, PyYAML's
    dialect, wants a dot and a signed exponent, 1.0e-3, and reads 1e-3 as a string.)"""


class _Dumper(yaml.SafeDumper):
    """Writes what _Loader reads back identically (a string such as '1e-3' is quoted)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


def yaml_load(text: str):
    """Parse YAML text (config files, experiments files, saved configs, command-line values)."""
    return yaml.load(text, Loader=_Loader)


def yaml_value(value) -> str:
    """A value as command-line text that yaml_load reads back as the same value (floats keep every
    digit, strings that would read as something else are quoted)."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**9).strip()
    return text[:-len("\n...")] if text.endswith("\n...") else text  # a lone scalar ends its document


@dataclass(frozen=True)
class Option:
    kind: type                                  # bool, int, float or str
    check: Callable[[Any], bool] | None = None  # extra constraint on the typed value
    allowed: str = ""                           # words for the error message
    nullable: bool = False


def _choice(*names: str) -> Option:
    return Option(str, lambda v: v in names, "one of " + ", ".join(names))


def _registry_choice(registry_getter: Callable[[], list[str]], extra: tuple[str, ...] = ()) -> Option:
    # Registries are read lazily so that config.py does not import torch to validate a name.
    return Option(str, lambda v: v in (*extra, *registry_getter()),
                  "one of " + ", ".join((*extra, *registry_getter())))


def _datasets() -> list[str]:
    from data import DATASETS
    return sorted(DATASETS)


def _models() -> list[str]:
    from models import MODELS
    return sorted(MODELS)


def _server_opts() -> list[str]:
    from optimizers import SERVER_OPTIMIZERS
    return sorted(SERVER_OPTIMIZERS)


def _strategies() -> list[str]:
    from merging import STRATEGIES
    return sorted(STRATEGIES)


def _client_opts() -> list[str]:
    from optimizers import CLIENT_OPTIMIZERS
    return sorted(CLIENT_OPTIMIZERS)


# algorithms.ALGORITHMS' names (algorithms.py imports config through shadows.py, so they are listed here;
# tests/test_algorithms.py checks the two agree).
ALGORITHM_NAMES = ("fedavg", "fedsa", "scaffold", "fedex", "flora", "flexlora", "hetlora")

_positive = Option(float, lambda v: v > 0, "a number > 0")
_density = Option(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_pos_int = Option(int, lambda v: v >= 1, "an integer >= 1")
_nonneg_int = Option(int, lambda v: v >= 0, "an integer >= 0")

SCHEMA: dict[str, Option] = {
    "dir": Option(str, lambda v: v != "", "a non-empty path"),
    "name": Option(str, lambda v: v not in ("", ".", "..") and "/" not in v,
                   "a non-empty folder name without '/'"),
    "seed": _nonneg_int,
    "gpu": Option(str, lambda v: v in ("auto", "cpu") or v.isdigit(),
                  "auto, cpu or a CUDA device index such as 0"),
    "bf16": Option(bool),
    "deterministic": Option(bool),
    "dataset": _registry_choice(_datasets),
    "data_dir": Option(str, lambda v: v != "", "a non-empty path"),
    "max_length": Option(int, lambda v: v == 0 or 8 <= v <= 4096, "0 (dataset default) or an integer in [8, 4096]"),
    "clients": Option(int, lambda v: v >= 0, "an integer >= 0 (0: every user, with a natural partition)"),
    "partition": _choice("auto", "natural", "dirichlet", "iid"),
    "iid_alpha": _positive,
    "min_client_size": _nonneg_int,
    "iid_mix": Option(float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0: natural clients, 1: IID)"),
    "augment": Option(bool),
    "model": _registry_choice(_models, extra=("auto",)),
    "model_path": Option(str, lambda v: v != "", "a folder path or null", nullable=True),
    "lora_rank": Option(int, lambda v: v >= -1, "an integer >= -1 (0: head only, -1: full fine-tuning)"),
    "lora_alpha": _positive,
    "lora_dropout": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
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
    "client_parallelism": _pos_int,
    "algorithm": _choice(*ALGORITHM_NAMES),
    "local_head": Option(bool),
    "hetlora_prune": Option(bool),
    "hetlora_gamma": Option(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
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
    "beta2": Option(float, lambda v: 0 <= v < 1, "a number in [0, 1) or null (the server optimizer's default)",
                    nullable=True),
    "tau": Option(float, lambda v: v > 0, "a number > 0 or null (the server optimizer's default)", nullable=True),
    "weight_decay": Option(float, lambda v: v >= 0, "a number >= 0 or null (0.01 with server_opt adamw)",
                           nullable=True),
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
    "target_accuracy": Option(float, lambda v: v >= 0, "a number >= 0 (a value of the primary metric) or null",
                              nullable=True),
    "drift_stats": Option(bool),
    "shadow_strategies": Option(list, lambda v: all(_is_shadow(x) for x in v),
                                "a list of names that merging_strategy accepts, each alone or as NAME@factors / NAME@product"),
    "shadow_freq": _pos_int,
    "shadow_eval_examples": _nonneg_int,
}


def _is_shadow(entry: str) -> bool:
    name, _, space = entry.partition("@")
    return name in _strategies() and space in ("", "factors", "product")


def shadow_spec(entry: str, cfg) -> tuple[str, str]:
    """'ties@product' -> ('ties', 'product'); without @ the run's merge_space."""
    name, _, space = entry.partition("@")
    return name, space or cfg.merge_space


class Config(dict):
    """A validated mapping of every option; options read as attributes (cfg.client_lr)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


PRESET_DIR = "paper"   # configs/paper/NAME.yaml: the FLASC code's exact settings, --config paper/NAME


def list_configs() -> list[str]:
    """Every name --config accepts: configs/NAME.yaml, then the presets as paper/NAME."""
    return (sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            + sorted(f"{PRESET_DIR}/{p.stem}" for p in (CONFIG_DIR / PRESET_DIR).glob("*.yaml")))


def describe_config(name: str) -> str:
    """The first sentence of the comment that opens configs/NAME.yaml (what the config is)."""
    words = []
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
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
            raise ConfigError(f"{where}: no file {path}; expected a config name ({', '.join(list_configs())}) "
                              "or the path of a .yaml file")
    elif name not in list_configs():
        raise ConfigError(f"{where}: no config named '{name}'; available: {', '.join(list_configs())}, "
                          "or the path of a .yaml file")
    if path.resolve() in [p for _, p in chain]:
        raise ConfigError(f"{chain[-1][0]}: extends {name}, which extends it back; expected a chain without cycles")
    values = _read_yaml(path)
    parent = values.pop("extends", None)
    label = str(path) if is_config_path(name) else f"configs/{name}.yaml"
    layer = (label, values)
    return [layer] if parent is None else [*_config_layers(str(parent), (*chain, (label, path.resolve()))), layer]


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml_load(path.read_text())
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
    return ConfigError(f"unknown option '{key}' in {where}{hint}; "
                       f"options are documented in configs/{BASIC}.yaml")


def coerce(key: str, value: Any) -> Any:
    """Type-check one value; ints are accepted where floats are expected."""
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
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not valid; expected {_describe(opt)}")
    if opt.kind is list and opt.check is not None:
        bad = [x for x in value if not opt.check([x])]
        if bad:
            raise ConfigError(f"{key}: {bad[0]!r} is not valid; expected {_describe(opt)}")
    if opt.check is not None and not opt.check(value):
        raise ConfigError(f"{key}: {value!r} is out of range; expected {_describe(opt)}")
    return value


def _describe(opt: Option) -> str:
    if opt.allowed:
        return opt.allowed
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list"}[opt.kind]


def resolved_partition(cfg) -> str:
    """auto: each natural user one client where the data set has users, else a Dirichlet label skew."""
    if cfg.partition != "auto":
        return cfg.partition
    from data import DATASETS
    return "natural" if DATASETS[cfg.dataset].natural_users else "dirichlet"


def _check_task(cfg: Config) -> None:
    """The data set, the model and the options that depend on what the task is."""
    from data import DATASETS
    from models import MODELS, resolve_name
    data, model_name = DATASETS[cfg.dataset], resolve_name(cfg)
    model = MODELS[model_name]
    fitting = [n for n, m in MODELS.items() if m.inputs == data.inputs and (m.lm_head or data.objective != "next_token")]
    if model.inputs != data.inputs or (data.objective == "next_token" and not model.lm_head):
        what = "a language model" if data.objective == "next_token" else f"{data.inputs} input"
        raise ConfigError(f"model: {model_name} does not fit dataset {cfg.dataset}, which needs {what}; "
                          f"expected auto or one of {', '.join(fitting)}")
    partition = resolved_partition(cfg)
    if partition == "natural" and not data.natural_users:
        raise ConfigError(f"partition: natural makes each user a client, but dataset {cfg.dataset} has no "
                          "users; expected auto, dirichlet or iid")
    if partition == "dirichlet" and data.objective != "single_label":
        raise ConfigError(f"partition: dirichlet skews single labels, but dataset {cfg.dataset} is "
                          f"{data.objective.replace('_', '-')}; expected auto, natural or iid")
    if cfg.clients == 0 and partition != "natural":
        raise ConfigError(f"clients: 0 means every user of a natural partition; partition {partition} "
                          "needs a number of clients >= 1")
    if cfg.augment and data.inputs != "image":
        raise ConfigError(f"augment: dataset {cfg.dataset} has text; random crops and flips apply to images; "
                          "expected false")
    if cfg.max_length and data.inputs != "text":
        raise ConfigError(f"max_length: dataset {cfg.dataset} has images, not tokens; expected 0")
    if data.objective == "next_token" and cfg.lora_rank == 0:
        raise ConfigError(f"lora_rank: 0 trains only a classifier head, and dataset {cfg.dataset} is language "
                          "modelling without one; expected lora_rank >= 1 or -1")
    if cfg.merging_strategy == "fisher" and data.objective == "next_token":
        raise ConfigError(f"merging_strategy: fisher takes the exact expectation over labels, out of reach over "
                          f"a vocabulary at every token of dataset {cfg.dataset}; expected another strategy")
    if not model.linear_lora and (cfg.merge_space == "product" or cfg.merging_strategy == "regmean"):
        key = "merge_space" if cfg.merge_space == "product" else "merging_strategy"
        raise ConfigError(f"{key}: {cfg[key]} works on LoRA of linear layers; model {model_name} adapts "
                          "convolutions; expected merge_space: factors and a strategy other than regmean")


def _resolve_server_defaults(values: dict) -> dict:
    """beta2, tau and weight_decay left null take the server optimizer's own defaults
    (optimizers.server_defaults), so the saved config records the values a run used."""
    from optimizers import server_defaults
    defaults = server_defaults(values["server_opt"])
    if values["weight_decay"] is not None and "weight_decay" not in defaults:
        raise ConfigError(f"weight_decay: decoupled weight decay is part of server_opt adamw; "
                          f"server_opt {values['server_opt']} has none; expected null")
    return {**values, **{k: v for k, v in defaults.items() if values[k] is None}}


def _check_together(cfg: Config) -> None:
    """Constraints between options."""
    _check_task(cfg)
    if cfg.clients and cfg.server_batch > cfg.clients:
        raise ConfigError(f"server_batch: {cfg.server_batch} clients per round is more than "
                          f"clients ({cfg.clients}); expected at most {cfg.clients}")
    if cfg.merge_space == "product" and cfg.lora_rank <= 0:
        raise ConfigError(f"merge_space: product merges LoRA products B·A; expected lora_rank >= 1 "
                          f"(got {cfg.lora_rank}) or merge_space: factors")
    if cfg.merging_strategy == "regmean" and cfg.lora_rank <= 0:
        raise ConfigError(f"merging_strategy: regmean merges LoRA layers; expected lora_rank >= 1 "
                          f"(got {cfg.lora_rank})")
    if cfg.dp_divide_by_clip and cfg.l2_clip_norm <= 0:
        raise ConfigError("dp_divide_by_clip: divides the sum of clipped updates by the clipping norm; "
                          "expected l2_clip_norm > 0 as well")
    if cfg.noise_multiplier > 0:
        if cfg.l2_clip_norm <= 0:
            raise ConfigError("noise_multiplier: noise is scaled by the clipping norm; expected "
                              "l2_clip_norm > 0 as well")
        if (cfg.merging_strategy, cfg.weighting, cfg.merge_space) != ("average", "uniform", "factors"):
            raise ConfigError("noise_multiplier: the Gaussian mechanism is accounted for the uniform mean of "
                              "clipped updates; expected merging_strategy: average, weighting: uniform, "
                              "merge_space: factors")
    if cfg.tiers > 1:
        _check_tiers(cfg)
    if cfg.freeze_a and cfg.lora_rank <= 0:
        raise ConfigError("freeze_a: true needs LoRA adapters; expected lora_rank >= 1 "
                          f"(got {cfg.lora_rank})")
    if cfg.shadow_strategies:
        _check_shadows(cfg)
    _check_algorithm(cfg)
    if cfg.client_parallelism > 1:
        _check_client_parallelism(cfg)


def _check_client_parallelism(cfg: Config) -> None:
    """Clients trained together route rows through stacked LoRA factors of linear layers and linear
    heads (stacked.py); nothing else can be stacked."""
    from models import MODELS, resolve_name
    if cfg.lora_rank < 0:
        raise ConfigError("client_parallelism: clients trained together share the frozen base model and stack "
                          "their adapters; full fine-tuning (lora_rank -1) trains the base itself; expected "
                          "client_parallelism: 1 or lora_rank >= 0")
    if not MODELS[resolve_name(cfg)].linear_lora:
        raise ConfigError(f"client_parallelism: stacked adapters are LoRA of linear layers; model "
                          f"{resolve_name(cfg)} adapts convolutions (and draws its stochastic depth outside "
                          "dropout layers); expected client_parallelism: 1")


# Algorithms that set the server's model themselves (no server optimizer step of their own).
_SETS_SERVER = ("fedex", "flora", "flexlora")
_RANK_TIERS = ("fedavg", "flora", "flexlora", "hetlora")


def _check_algorithm(cfg: Config) -> None:
    """Which options mean something with each algorithm (README "Federated LoRA baselines")."""
    a = cfg.algorithm
    if cfg.hetlora_prune and a != "hetlora":
        raise ConfigError(f"hetlora_prune: rank self-pruning is HetLoRA's; expected algorithm: hetlora or "
                          f"hetlora_prune: false (algorithm is {a})")
    if a == "fedavg":
        return
    if cfg.lora_rank <= 0 and a != "scaffold":
        raise ConfigError(f"algorithm: {a} works on LoRA adapters; expected lora_rank >= 1 (got {cfg.lora_rank})")
    if (cfg.merging_strategy, cfg.merge_space) != ("average", "factors"):
        raise ConfigError(f"merging_strategy: algorithm {a} aggregates by its own rule; expected merging_strategy: "
                          "average and merge_space: factors (merging strategies run with algorithm: fedavg)")
    if cfg.shadow_strategies:
        raise ConfigError(f"shadow_strategies: shadows re-aggregate the updates of algorithm fedavg; expected [] "
                          f"with algorithm {a}")
    if cfg.dl_density < 1 or cfg.dl_density_decay < 1 or cfg.server_freeze or cfg.client_freeze:
        raise ConfigError(f"dl_density: algorithm {a} sends its clients what its method prescribes, dense; "
                          "expected dl_density: 1, dl_density_decay: 1, server_freeze and client_freeze false")
    if a == "scaffold" and (cfg.ul_density < 1 or cfg.ul_density_decay < 1):
        raise ConfigError("ul_density: SCAFFOLD's control variates are computed from the whole local change; "
                          "expected ul_density: 1 and ul_density_decay: 1 with algorithm scaffold")
    if cfg.noise_multiplier > 0 and a != "fedsa":
        raise ConfigError(f"noise_multiplier: the Gaussian mechanism covers a uniform mean of clipped updates; "
                          f"algorithm {a} uses the updates otherwise (products, control variates); expected 0 "
                          "(or algorithm fedavg or fedsa)")
    if a in _SETS_SERVER and (cfg.server_opt, cfg.server_lr, cfg.server_schedule) != ("sgd", 1.0, "constant"):
        raise ConfigError(f"server_opt: algorithm {a} sets the server's model itself; expected server_opt: sgd, "
                          "server_lr: 1 and server_schedule: constant")
    if cfg.freeze_a and a in ("fedsa", "flexlora"):
        raise ConfigError(f"freeze_a: algorithm {a} learns A ({'the only shared part' if a == 'fedsa' else 'by SVD'}); "
                          "expected freeze_a: false")
    if cfg.tiers > 1 and a not in _RANK_TIERS:
        raise ConfigError(f"tiers: algorithm {a} trains one rank on every client; expected tiers: 1 (tiers run "
                          f"with algorithm {', '.join(_RANK_TIERS)})")
    if cfg.tiers > 1 and cfg.syshet != "rank":
        raise ConfigError(f"syshet: algorithm {a} with tiers gives each tier a rank; expected syshet: rank")
    from models import MODELS, resolve_name
    if a in ("fedex", "flora", "flexlora") and not MODELS[resolve_name(cfg)].linear_lora:
        raise ConfigError(f"algorithm: {a} works on products B·A of linear layers; model {resolve_name(cfg)} "
                          "adapts convolutions; expected another algorithm")


def _check_shadows(cfg: Config) -> None:
    """Each shadow strategy must be one the run could use itself (noise aside: shadows are analysis,
    their metrics are outside the privacy guarantee)."""
    for entry in cfg.shadow_strategies:
        name, space = shadow_spec(entry, cfg)
        trial = Config({**cfg, "merging_strategy": name, "merge_space": space, "shadow_strategies": [],
                        "noise_multiplier": 0.0})
        try:
            _check_together(trial)
        except ConfigError as e:
            raise ConfigError(f"shadow_strategies: {entry}: {e}") from None


def _check_tiers(cfg: Config) -> None:
    if cfg.lora_rank <= 0:
        raise ConfigError(f"tiers: heterogeneity tiers need LoRA adapters; expected lora_rank >= 1 "
                          f"(got {cfg.lora_rank})")
    if cfg.merge_space != "factors":
        raise ConfigError("tiers: clients of different tiers start from different downloads; expected "
                          "merge_space: factors")
    if cfg.server_freeze:
        raise ConfigError("tiers: each tier has its own download mask; expected server_freeze: false")
    if cfg.syshet in ("rank", "rankl1"):
        top = 4 ** (cfg.tiers - 1)
        if cfg.lora_rank < top:
            raise ConfigError(f"lora_rank: {cfg.tiers} rank tiers train ranks 1..{top}; expected "
                              f"lora_rank >= {top} (got {cfg.lora_rank})")
        if cfg.dl_density < 1 or cfg.ul_density < 1:
            raise ConfigError("syshet: rank tiers send whole components; expected dl_density: 1 and "
                              "ul_density: 1 (or syshet: density)")


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config's NAME or path, the other arguments)."""
    name, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            if "=" in argv[i]:
                name = argv[i].split("=", 1)[1]
            elif i + 1 < len(argv):
                name, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a name; see --list-configs")
        else:
            rest.append(argv[i])
        i += 1
    return name, rest


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """'--client-lr 0.1' / '--client_lr=0.1' -> {'client_lr': 0.1}; values parsed as YAML scalars."""
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
    cfg = Config(_resolve_server_defaults({key: coerce(key, values[key]) for key in SCHEMA}))
    _check_together(cfg)
    return cfg


def from_mapping(values: dict[str, Any]) -> Config:
    """Validate a complete mapping (e.g. a saved run's config.yaml)."""
    for key in values:
        if key not in SCHEMA:
            raise _unknown(str(key), "the saved config")
    return load_config(overrides=values)


def dump(cfg: Config) -> str:
    return yaml.dump(dict(cfg), Dumper=_Dumper, sort_keys=False)
