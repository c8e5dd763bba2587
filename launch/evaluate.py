"""Evaluate a model on a held-out JSONL file; the last line printed is the metrics as one JSON object.

    python launch/evaluate.py model.path=outputs/demo/export data.eval=test.jsonl
    python launch/evaluate.py model.path=DIR data.eval=FILE task=reranker eval.save_run=run.trec

model.path is an exported folder (its ember_task.json sets the task unless overridden on the
command line) or any Hugging Face folder of a supported family.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.host_memory import request_huge_pages  # noqa: E402

request_huge_pages()  # before torch is imported: torch reads it at its first allocation

from engine.cli import compose, run_cli  # noqa: E402
from engine.config import ConfigError, validate  # noqa: E402


def _apply_export_settings(cfg, argv: list[str]) -> None:
    """Settings saved at export time, except those the command line names explicitly."""
    from engine.export import settings_from_export

    cfg.task, cfg.data, cfg.model.causal = settings_from_export(cfg, argv, cfg.model.path)


def main(argv: list[str]) -> int:
    cfg, _ = compose(argv)
    if not cfg.model.path:
        raise ConfigError("model.path is required (an exported folder or a Hugging Face model folder)")
    if not cfg.data.eval:
        raise ConfigError("data.eval is required (a JSONL file in a supported format)")
    validate(cfg, need_train_data=False)
    _apply_export_settings(cfg, argv)

    from engine.api import load_task_model
    from engine.data.formats import load_examples
    from engine.build import autocast_dtype, resolve_device
    from engine.train.evaluate import evaluate_task
    from engine.kernels.select import select_kernels

    examples = load_examples(cfg.data.eval, on_error=cfg.data.on_error)
    device = resolve_device(cfg.train.device)
    select_kernels(cfg.kernels, device)
    task, text_encoder = load_task_model(cfg.model.path, cfg.task, cfg.data, cfg.model.causal, device)
    print(f"evaluating {cfg.model.path} ({cfg.task.type}) on {len(examples)} queries from {cfg.data.eval}",
          file=sys.stderr)
    metrics = evaluate_task(task, text_encoder, examples, cfg, device,
                            autocast_dtype(cfg.model, device), save_run=cfg.eval.save_run or None)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    run_cli(main)
