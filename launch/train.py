"""Train an embedding or reranker model.

    python launch/train.py +exp=demo
    torchrun --nproc_per_node=1 launch/train.py task=reranker data.train=train.jsonl train.max_steps=100
    torchrun --nproc_per_node=4 launch/train.py +exp=demo parallel.tp=2     # tp 2 x dp 2
    python launch/train.py +exp=reranker_70b train.dry_run=true

Hydra-style overrides over conf/train.yaml; every key is in docs/config.md.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.host_memory import request_huge_pages  # noqa: E402

request_huge_pages()  # before torch is imported: torch reads it at its first allocation

from engine.cli import compose, rank_prefix, run_cli  # noqa: E402
from engine.config import ConfigError, validate  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, config_yaml = compose(argv)
    validate(cfg)
    if cfg.train.dry_run:
        from engine.train.dry_run import dry_run

        dry_run(cfg)
        return 0
    # The layout is checked against the model and batch before any process group or model exists.
    from engine.parallel.layout import check_trainable_layout, layout_from_config
    from engine.parallel.mesh import init_mesh, shutdown
    from engine.build import model_args, resolve_device

    layout = layout_from_config(cfg.parallel, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_trainable_layout(cfg, layout, model_args(cfg.model))
    mesh = init_mesh(layout, resolve_device(cfg.train.device), cfg.train.collective_timeout)
    finished = False
    try:
        code = _train(cfg, config_yaml, mesh)
        finished = code == 0
        return code
    finally:
        shutdown(mesh, finished=finished)


def _train(cfg, config_yaml: str, mesh) -> int:
    from engine.train.trainer import Trainer, TrainingAborted

    from engine.parallel.progress import is_collective_failure

    trainer = Trainer(cfg, config_yaml, mesh)
    try:
        results = trainer.train()
    except TrainingAborted as err:
        print(f"{rank_prefix()}training aborted: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a peer that died or stopped joining: one line, not a backend traceback
        if not is_collective_failure(err):
            raise
        print(f"{rank_prefix()}{trainer.progress.explain(err)}", file=sys.stderr, flush=True)
        return 1
    summary = {"run_dir": cfg.train.output_dir, "steps": trainer.step}
    for when in ("zero_shot", "final"):
        if results.get(when):
            summary[when] = results[when]
    if cfg.export.output_dir:
        full_model = trainer.full_model()  # collective: every rank hands over its shards
        if mesh.is_logging_rank:
            from engine.export import export_task

            export_task(full_model, cfg, trainer.tokenizer, cfg.export.output_dir)
            summary["export"] = cfg.export.output_dir
            print(f"[ember] exported the final model to {cfg.export.output_dir}")
    if not mesh.is_logging_rank:
        return 0
    if results.get("zero_shot") and results.get("final"):
        for k in cfg.eval.k[-1:]:
            before, after = results["zero_shot"][f"mrr@{k}"], results["final"][f"mrr@{k}"]
            print(f"[ember] held-out MRR@{k}: zero-shot {before:.4f} -> fine-tuned {after:.4f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
