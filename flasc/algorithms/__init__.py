"""Federated algorithms (option `algorithm`), one file each; base.py says what an algorithm is.

Every module of this package is imported here, and each subclass of FedAvg it defines with a
`name` of its own is registered under that name: adding an algorithm is its file, its config
(configs/NAME.yaml) and its test.
"""

from __future__ import annotations

import importlib
import pkgutil

from flasc.algorithms.base import FedAvg


def _discover() -> dict[str, type[FedAvg]]:
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")
    found, todo = {FedAvg.name: FedAvg}, [FedAvg]
    while todo:
        for cls in todo.pop(0).__subclasses__():
            if cls.name in found and found[cls.name] is not cls:
                raise RuntimeError(f"two algorithms are named {cls.name}: {found[cls.name]} and {cls}")
            found[cls.name] = cls
            todo.append(cls)
    return {"fedavg": FedAvg, **{k: found[k] for k in sorted(found) if k != "fedavg"}}


ALGORITHMS: dict[str, type[FedAvg]] = _discover()

__all__ = ["ALGORITHMS", "FedAvg"]
