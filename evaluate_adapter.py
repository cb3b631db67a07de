"""Score a saved adapter on benchmark tasks: a flasc run folder (or its adapter/), or a peft
adapter trained elsewhere, on its base causal LM.

    python evaluate_adapter.py RUN_DIR_OR_ADAPTER --task FILE_OR_NAME [--task ...]
        [--model BASE] [--model-path DIR] [--limit N] [--batch N] [--gpu auto|cpu|N] [--bf16]
        [--include-path DIR] [--out FILE]

A --task FILE is a scoring task of flasc/tasks/llm_eval.py (multiple choice or generation). A
--task NAME that is not a file is a task of lm-evaluation-harness (needs `pip install -r
requirements-llm.txt`; --include-path adds a folder of its task YAML files). The scores are
printed and written as JSON to RUN_DIR/llm_eval.json (a peft adapter: ADAPTER/llm_eval.json),
or to --out.

A run folder is rebuilt as its config.yaml says (base model, precision, quantization) with its
saved adapter; --model-path points at the base weights where the run's model_path no longer
holds them. A peft adapter is loaded on --model, else on its adapter_config.json's
base_model_name_or_path (a hub id needs a network, or --model-path with a copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class Refused(Exception):
    """Bad input: one line, exit 2."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate_adapter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="a flasc run folder, its adapter/ folder, or a peft adapter folder")
    p.add_argument("--task", action="append", required=True, help="a scoring-task file, or an lm-eval task name")
    p.add_argument("--model", help="the base model of a peft adapter (default: its base_model_name_or_path)")
    p.add_argument("--model-path", help="a folder holding the base model's weights (a copy made elsewhere)")
    p.add_argument("--limit", type=int, default=0, help="score the first N rows of each task (0: all)")
    p.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--gpu", default="auto", help="auto | cpu | a CUDA device index")
    p.add_argument("--bf16", action="store_true", help="score under bfloat16 autocast")
    p.add_argument("--include-path", help="lm-eval: a folder of task YAML files")
    p.add_argument("--out", help="where the JSON goes (default: llm_eval.json in the run or adapter folder)")
    return p.parse_args(argv)


def run_folder(path: Path) -> Path | None:
    """The flasc run folder of PATH (PATH itself, or the run holding PATH as its adapter/)."""
    for folder in (path, path.parent):
        if (folder / "config.yaml").is_file() and (folder / "adapter").is_dir():
            return folder
    return None


def load_run(run_dir: Path, model_path: str | None):
    """(model, tokenizer, cfg) of a finished flasc run, as its config.yaml says."""
    import config
    from data import DATASETS
    from flasc import models

    saved = config.yaml_load(config.read_text(run_dir / "config.yaml", "a run's config.yaml"))
    if model_path:
        saved["model_path"] = model_path
    cfg = config.from_mapping(saved)
    if DATASETS[cfg.dataset].objective != "next_token":
        raise Refused(
            f"{run_dir} trained a classifier (dataset {cfg.dataset}); scoring tasks score a causal LM "
            "(a run of dataset instructions or reddit)"
        )
    tok = models.load_tokenizer(cfg)[0]
    model = models.load_trained(cfg, run_dir / "adapter", 0, tok.pad_token_id, lm_head=True)
    return model, tok, cfg


def load_peft(folder: Path, base: str | None, model_path: str | None):
    """(model, tokenizer) of a peft adapter folder on its base causal LM."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flasc.models.build import with_lm_parts

    meta = json.loads((folder / "adapter_config.json").read_text())
    name = base or meta.get("base_model_name_or_path")
    source = model_path or name
    if not source:
        raise Refused(f"{folder}/adapter_config.json names no base model; give it with --model")
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = AutoTokenizer.from_pretrained(str(folder) if has_tokenizer else source)
    except (OSError, ValueError) as e:  # not found, no network, no tokenizer files
        raise Refused(
            f"the base model {source} cannot be loaded here ({type(e).__name__}); give a folder holding it with "
            "--model-path (with HF_HUB_OFFLINE=1 for a copy in the hub's cache)"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return with_lm_parts(PeftModel.from_pretrained(model, str(folder))), tok


def lm_eval_scores(model, tok, name: str, args, device) -> dict:
    """lm-evaluation-harness's task `name` on the model (its own metrics, as it names them)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise Refused(
            f"--task {name}: no such file, and a task name is lm-evaluation-harness's, which is not installed: "
            "pip install -r requirements-llm.txt"
        ) from None
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    if name not in manager.all_tasks:
        raise Refused(
            f"--task {name}: no such file, and lm-evaluation-harness has no task of that name"
            + ("" if args.include_path else " (--include-path adds a folder of task files)")
        )
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch, device=str(device))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[name], task_manager=manager, limit=args.limit or None, log_samples=False, verbosity="ERROR"
    )
    return {k: v for k, v in out["results"][name].items() if isinstance(v, (int, float)) and k != "alias"}


def scores_of(model, tok, args, device) -> dict:
    from flasc.options import ConfigError
    from flasc.tasks import llm_eval

    results = {}
    for spec in args.task:
        if Path(spec).is_file():
            try:
                task = llm_eval.load_task_file(spec)
            except ConfigError as e:
                raise Refused(f"--task {e}") from None
            if args.limit:
                task.rows = task.rows[: args.limit]
            results[task.name] = llm_eval.score(model, tok, task, device, args.bf16)
        else:
            results[spec] = lm_eval_scores(model, tok, spec, args, device)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    path = Path(args.adapter)
    from flasc.models import ModelUnavailable
    from flasc.options import ConfigError
    from flasc.tasks.prompts import PromptError

    try:
        run_dir = run_folder(path)
        if run_dir is None and not (path / "adapter_config.json").is_file():
            raise Refused(
                f"{path}: neither a flasc run folder (config.yaml, adapter/) nor a peft adapter (adapter_config.json)"
            )
        import torch

        from flasc.runtime.distributed import pick_device

        device = pick_device(args.gpu)
        if run_dir is not None:
            model, tok, _ = load_run(run_dir, args.model_path)
        else:
            model, tok = load_peft(path, args.model, args.model_path)
        model = model.to(device).eval()
        with torch.no_grad():
            results = scores_of(model, tok, args, device)
    except (Refused, ConfigError, ModelUnavailable, PromptError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from flasc.runtime import tracking

    out = Path(args.out) if args.out else (run_dir or path) / "llm_eval.json"
    tracking.write_json_atomic(out, {"adapter": str(path), "results": results})
    for task, metrics in results.items():
        for metric, value in metrics.items():
            print(f"{task:24s} {metric:16s} {value:.4f}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
