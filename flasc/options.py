"""What every component shares about configuration: the error a bad value raises, the validated
mapping the run reads, and the YAML dialect configs are written in.

config.py (at the top level) builds a Config from configs/basic_config.yaml, overlays and the
command line and checks each value's type and range; the components (algorithms, merging
strategies and spaces, optimizers, data sets, model families, privacy, tiers, stacked clients,
shadows) each declare the options they read and check the combinations they refuse, raising
ConfigError. Components import this module, never config.py.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad configuration: the message names the key and what is allowed."""


class Config(dict):
    """A validated mapping of every option; options read as attributes (cfg.client_lr)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _Loader(yaml.SafeLoader):
    """YAML with numbers as people write them: 1e-3, 5E-4 and 1e5 are floats. (YAML 1.1, PyYAML's
    dialect, wants a dot and a signed exponent, 1.0e-3, and reads 1e-3 as a string.)"""


class _Dumper(yaml.SafeDumper):
    """Writes what _Loader reads back identically (a string such as '1e-3' is quoted)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def read_text(path, expected: str = "a YAML file") -> str:
    """A text file the user gave (a config, an experiments file, a run's config.yaml): ConfigError
    naming the file when it cannot be read or is not UTF-8 text."""
    from pathlib import Path

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); expected {expected}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); expected {expected} saved as UTF-8"
        ) from None


def yaml_load(text: str):
    """Parse YAML text (config files, experiments files, saved configs, command-line values)."""
    return yaml.load(text, Loader=_Loader)


def yaml_value(value) -> str:
    """A value as command-line text that yaml_load reads back as the same value (floats keep every
    digit, strings that would read as something else are quoted)."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**9).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text  # a lone scalar ends its document


def dump(cfg: Config) -> str:
    """A config as config.yaml holds it, in schema order."""
    return yaml.dump(dict(cfg), Dumper=_Dumper, sort_keys=False)
