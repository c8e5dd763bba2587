"""bench/gpu/check.sh --dry-run: the GPU check's CPU-safe parts run in the suite, so the script that
only runs on a lent GPU cannot rot between loans."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "bench", "gpu", "check.sh")


def check(*args, venv=None, timeout=400):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": REPO, "EMBER_GPU_VENV": str(venv or "/nonexistent")}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_dry_run_installs_the_lock_and_passes_every_cpu_safe_step(tmp_path):
    """--torch system: the lock's packages (less torch's lines) really install, beside this
    interpreter's torch, and the GPU tests' selection and the smoke run go through that install."""
    result = check("--dry-run", "--torch", "system", str(tmp_path / "out"), venv=tmp_path / "install")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    for name in ("lock", "install", "gpu_tests", "smoke"):
        assert re.search(rf"^\| {name} \| passed \| \d+ \|$", summary, re.M), summary
    assert "| machine | skipped: dry run |" in summary
    # The gpu marker selects the GPU-only tests (all skipped here): none selected would be a broken marker.
    skipped = int(re.search(r"gpu tests: (\d+) skipped", summary).group(1))
    assert skipped >= 30, summary
    assert re.search(r"losses, PyTorch kernels: \[\d", summary), summary

    # The GPU install takes the lock minus the CPU torch and what CUDA torch brings itself.
    lock = [line for line in open(os.path.join(REPO, "requirements.lock")) if line.strip() and line[0] != "#"]
    gpu = (tmp_path / "out" / "requirements-gpu.txt").read_text().splitlines()
    assert not [line for line in gpu if re.match(r"(torch==|triton==|nvidia-)", line)]
    assert len(gpu) == len(lock) - sum(bool(re.match(r"(torch==|triton==|nvidia-)", line)) for line in lock)
    assert "transformers==" in "\n".join(gpu)
    # The steps ran on the installed packages, not on this interpreter's own.
    assert (tmp_path / "install" / "site" / "transformers").is_dir()
    assert (tmp_path / "out" / "python.txt").read_text().strip() == str(tmp_path / "install" / "python")


def test_dry_run_with_the_lock_torch_says_what_it_would_install(tmp_path):
    result = check("--dry-run", str(tmp_path / "out"), venv=tmp_path / "install")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "would install torch==" in (tmp_path / "out" / "install.log").read_text()
    assert not (tmp_path / "install").exists()


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    for args, fragment in ((["--torch", "conda", str(tmp_path)], "--torch conda"),
                           (["--wheels", str(tmp_path / "none"), str(tmp_path)], "no such folder"),
                           (["--nope", str(tmp_path)], "unknown option --nope")):
        result = check(*args, timeout=30)
        assert result.returncode == 2 and fragment in result.stderr, (args, result.stderr)
