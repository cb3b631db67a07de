"""Components own their options: each algorithm, merging strategy, data set, model family and
round part declares the options it reads (`options`) and checks the combinations it refuses
(`check`), and config.py asks the ones a config selects."""

import ast
import inspect
import textwrap

import pytest

import config
import merging
from data import DATASETS
from flasc.algorithms import ALGORITHMS
from flasc.federation import privacy, tiers
from flasc.models import MODELS


def reads(source: str, skip=("check",)) -> set[str]:
    """The options a piece of code reads as cfg.X / self.cfg.X / ctx.cfg.X, outside its `check` methods."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):  # drop the check methods: refusals read other components' options
        if isinstance(node, (ast.ClassDef, ast.Module)):
            node.body = [n for n in node.body if not (isinstance(n, ast.FunctionDef) and n.name in skip)]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
            owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if owner == "cfg":
                out.add(node.attr)
    return out


def test_reads_finds_what_code_reads_outside_check():
    code = "class A:\n    def f(self):\n        return self.cfg.seed + cfg.mu\n    def check(cfg):\n        cfg.tiers\n"
    assert reads(code) == {"seed", "mu"}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_algorithm_declares_what_it_reads(name):
    cls = ALGORITHMS[name]
    read = set().union(*(reads(inspect.getsource(c)) for c in cls.__mro__ if c is not object))
    assert read <= set(cls.options), f"{name} reads {sorted(read - set(cls.options))} without declaring them"


@pytest.mark.parametrize("name", sorted(merging.STRATEGIES))
def test_each_strategy_declares_what_it_reads(name):
    strategy = merging.STRATEGIES[name]
    read = reads(inspect.getsource(type(strategy))) - {"cfg"}
    if isinstance(strategy, merging.GeneralizedTaskArithmetic):  # one class, the options of its parameters
        used = {"magnitude": {"density", "ties_scope"}, "dare": {"drop_rate", "seed"}, None: set()}[strategy.sparsify]
        read = (read & used) | ({"scaling_coefficient"} if strategy.scaled else set())
    read.discard("seed")  # the seed of every random draw, the run's own
    assert read <= set(strategy.options), f"{name} reads {sorted(read - set(strategy.options))}"


def test_module_components_declare_what_they_read():
    for module in (privacy, tiers):
        read = reads(inspect.getsource(module)) - {"seed"}
        assert read <= set(module.options), f"{module.__name__} reads {sorted(read - set(module.options))}"


def test_every_declared_option_is_in_the_schema():
    cfg = config.load_config()
    declared = [
        (type(c).__name__ if not inspect.ismodule(c) else c.__name__, set(c.options))
        for c in [
            *config.components(cfg),
            *ALGORITHMS.values(),
            *merging.STRATEGIES.values(),
            *DATASETS.values(),
            *MODELS.values(),
        ]
        if hasattr(c, "options")
    ]
    for owner, options in declared:
        assert options <= set(config.SCHEMA), (owner, sorted(options - set(config.SCHEMA)))


def test_config_asks_the_selected_components():
    """A refusal that lives in a component is raised through load_config (here: one per kind)."""
    cases = [
        ({"algorithm": "scaffold", "l2_clip_norm": 1.0}, "l2_clip_norm: SCAFFOLD"),  # an algorithm
        ({"merging_strategy": "regmean", "lora_rank": 0}, "merging_strategy: regmean merges LoRA"),  # a strategy
        ({"merge_space": "product", "lora_rank": 0}, "merge_space: product merges"),  # a merge space
        ({"augment": True}, "augment: dataset bbcnews has text"),  # a data set
        ({"model": "tiny-vit"}, "model: tiny-vit does not fit dataset bbcnews"),  # a model family
        ({"tiers": 2, "lora_rank": 2}, "lora_rank: 2 rank tiers train ranks 1..4"),  # tiers
        ({"noise_multiplier": 1.0}, "noise_multiplier: noise is scaled"),  # privacy
        ({"client_parallelism": 2, "lora_rank": -1}, "client_parallelism: clients trained together"),
    ]
    for overrides, message in cases:
        with pytest.raises(config.ConfigError, match=message):
            config.load_config(overrides=overrides)
