"""launch/slurm/train.sbatch submitted to a real Slurm: a private one-host cluster (Debian's slurm-wlm
daemons and munge, started by launch/slurm/local_cluster.sh under a temporary folder) runs the
repository's script on CPU, 2 processes under torchrun's c10d rendezvous.

1. A plain `sbatch`: the job completes; its log shows the rendezvous, the steps and the checkpoints;
   its losses are the one-process run's (dp 2 vs one process, 1e-4 relative as tests/parallel/test_launch.py).
2. Requeued mid-run (`scontrol requeue`, as a preempted job would be): the job runs again under the
   same id, resumes from its newest checkpoint (train.resume=auto, which the script adds) and ends
   with the uninterrupted run's losses.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.cluster.conftest import TINY, assert_same_losses, losses
from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "launch", "slurm", "train.sbatch")
CLUSTER = os.path.join(REPO, "launch", "slurm", "local_cluster.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it (apt-get) needs root")
    subprocess.run([CLUSTER, "install"], check=True, timeout=600)
    folder = tmp_path_factory.mktemp("slurm")
    conf = subprocess.run([CLUSTER, "start", str(folder)], check=True, capture_output=True, text=True,
                          timeout=120).stdout.strip()
    yield {**os.environ, "SLURM_CONF": conf}
    subprocess.run([CLUSTER, "stop", str(folder)], timeout=60)


def submit(env: dict, run_dir, log_dir, *args: str) -> str:
    job_env = {**env, "EMBER_PYTHON": sys.executable, "EMBER_NPROC_PER_NODE": "2", "EMBER_OUTPUT_DIR": str(run_dir),
               "PYTHONPATH": REPO}
    out = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/job-%j.out", "--cpus-per-task=2", SCRIPT,
                          *TINY, *args], check=True, capture_output=True, text=True, timeout=60, cwd=REPO,
                         env=job_env)
    return out.stdout.strip().split(";")[0]


def job_state(env: dict, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30, env=env)
    fields = dict(part.split("=", 1) for part in out.stdout.split() if "=" in part)
    return fields.get("JobState", "UNKNOWN")


def wait_for(env: dict, job: str, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"slurm job {job} still {job_state(env, job)} after {timeout_s} s")


def test_sbatch_of_the_repository_script_trains_the_tiny_experiment(slurm, one_process_losses, tmp_path):
    job = submit(slurm, tmp_path / "run", tmp_path)
    state = wait_for(slurm, job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"[ember] slurm job {job} (requeued 0 times): 1 nodes" in log and "x 2 processes, rendezvous " in log, log
    assert "layout world 2 = pp 1 x dp 2" in log, log
    assert "[ember] launch: 2 processes on 1 node(s), 2 per node, met at " in log, log
    assert "[ember] step 6/6: loss" in log, log
    for step in (2, 4, 6):
        assert f"saved checkpoint {tmp_path / 'run' / 'checkpoints' / f'step_{step:08d}'}" in log, log
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000006")
    assert_same_losses(losses(tmp_path / "run"), one_process_losses, rel=1e-4)


def test_a_requeued_job_resumes_from_its_newest_checkpoint_with_the_same_losses(slurm, one_process_losses, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, run, tmp_path)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step_00000002").is_dir():  # requeue once the first checkpoint is there
        assert time.monotonic() < deadline and job_state(slurm, job) in ("PENDING", "RUNNING"), job_state(slurm, job)
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True, env=slurm, timeout=30)
    # Slurm holds a requeued job back for two minutes (its BeginTime), once its processes are gone: a
    # preempted job's wait, shortened here as soon as the job is pending again.
    deadline = time.monotonic() + 60
    while job_state(slurm, job) != "RUNNING" and time.monotonic() < deadline:
        if job_state(slurm, job) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, timeout=30)
        time.sleep(0.5)
    state = wait_for(slurm, job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"[ember] slurm job {job} (requeued 1 times)" in log, log
    assert "[ember] resumed from " in log and f"{run / 'checkpoints'}/step_0000000" in log, log
    assert_same_losses(losses(run), one_process_losses, rel=1e-4)


def test_local_cluster_usage_mistakes_exit_2():
    for args in ([], ["start"], ["restart", "/tmp/x"]):
        result = subprocess.run([CLUSTER, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and ("usage" in result.stderr), (args, result.returncode, result.stderr)
    assert subprocess.run([CLUSTER, "frobnicate"], capture_output=True, timeout=30).returncode == 2
