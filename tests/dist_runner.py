"""Several runs on the toy task in one torchrun launch (one process group for all of them), for
tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_runner.py SPECS.json

SPECS.json: a list of config overrides, one run each, in order.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import toy_spec  # also puts the repository on sys.path

import config  # noqa: E402
import data  # noqa: E402
import train_lora  # noqa: E402
from flasc.runtime import distributed  # noqa: E402

if __name__ == "__main__":
    data.DATASETS["toy"] = toy_spec()
    configs = [config.load_config(overrides=o) for o in json.loads(Path(sys.argv[1]).read_text())]
    world = distributed.start(torch.device("cpu"), 120)
    try:
        for cfg in configs:
            train_lora.train(cfg, world=world)
    finally:
        world.close()
