"""Shared by the cluster tests: the tiny experiment as they all run it, and how to launch it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.parallel.spawn import free_port
from tests.conftest import REPO, read_metrics

TRAIN = os.path.join(REPO, "launch", "train.py")
# 6 steps, a checkpoint every 2, no evaluation: seconds per run, and a step 3 between checkpoints.
TINY = ["+exp=tiny", "data.eval=null", "train.max_steps=6", "train.save_every=2"]


def env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def torchrun(nproc: int, run_dir, *args: str, torchrun_args: tuple[str, ...] = (), extra_env: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    standalone = () if any(a.startswith(("--rdzv", "--master")) for a in torchrun_args) else (
        f"--master_port={free_port()}",)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *standalone, *torchrun_args,
           TRAIN, *TINY, f"train.output_dir={run_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env(**(extra_env or {})))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_losses(got: dict[int, float], expected: dict[int, float], rel: float) -> None:
    assert sorted(got) == sorted(expected), (got, expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=rel), (step, got, expected)


@pytest.fixture(scope="session")
def one_process_losses(tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("one-process")
    subprocess.run([sys.executable, TRAIN, *TINY, f"train.output_dir={run}"], check=True, capture_output=True,
                   timeout=300, cwd=REPO, env=env())
    return losses(run)


@pytest.fixture(scope="session")
def two_rank_losses(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run of the layout the recovery tests interrupt (dp 2 under torchrun)."""
    run = tmp_path_factory.mktemp("two-ranks")
    result = torchrun(2, run)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run)
