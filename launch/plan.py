"""Plan a layout for a cluster: memory per rank, communication per step, step time; the
experiment's layout and the fitting ones ranked, the rest refused. Nothing is allocated.

    python launch/plan.py +exp=reranker_70b cluster.gpus=128 cluster.gpu_memory=80GB
    python launch/plan.py +exp=embedding_70b cluster.gpus=64 cluster.gpu_memory=141GB cluster.top=12

Hydra-style overrides over conf/train.yaml; the cluster.* keys are in docs/config.md, the model
behind the numbers in docs/cluster.md ("Planning").
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import compose, run_cli  # noqa: E402
from engine.config import validate, validate_cluster  # noqa: E402


def main(argv: list[str]) -> int:
    from engine.build import model_args
    from engine.plan.layouts import plan_cluster
    from engine.plan.report import report

    from dataclasses import replace

    cfg, _ = compose(argv)
    # A plan is a dry run on a cluster: no data, model folder or device is needed.
    cfg = replace(cfg, train=replace(cfg.train, dry_run=True))
    validate(cfg, need_train_data=False)
    validate_cluster(cfg.cluster)
    for line in report(cfg, plan_cluster(cfg, model_args(cfg.model)), cfg.cluster.top):
        print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
