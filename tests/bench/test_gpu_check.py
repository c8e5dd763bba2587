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
    interpreter's torch, and the GPU tests' selection, the smoke run and the three benchmarks (at toy
    sizes on CPU, Triton under its interpreter) go through that install."""
    result = check("--dry-run", "--torch", "system", str(tmp_path / "out"), venv=tmp_path / "install")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    for name in ("lock", "install", "gpu_tests", "smoke", "attention", "infonce", "train_step"):
        assert re.search(rf"^\| {name} \| passed \| \d+ \|$", summary, re.M), summary
    assert "| machine | skipped: dry run |" in summary
    # The gpu marker selects the GPU-only tests (all skipped here): none selected would be a broken marker.
    skipped = int(re.search(r"gpu tests: (\d+) skipped", summary).group(1))
    assert skipped >= 30, summary
    assert re.search(r"losses, PyTorch kernels: \[\d", summary), summary
    # One line per benchmark figure, ready for docs/performance.md: each backend measured or said skipped.
    assert re.search(r"^- attention forward \+ backward, 32 tokens, .*: triton [\d.]+ ms .*; sdpa [\d.]+ ms .*; "
                     r"flash_attn (skipped \(flash-attn is not installed\)|[\d.]+ ms).*; triton/sdpa time [\d.]+x",
                     summary, re.M), summary
    assert re.search(r"^- InfoNCE forward \+ backward, B = N = 64, d = 16, float32, CPU: chunked [\d.]+ ms, .*; "
                     r"triton [\d.]+ ms, .*; triton/chunked time [\d.]+x", summary, re.M), summary
    assert re.search(r"^- train step, qwen3 .*, full fine-tuning, float32, recompute full, .*: [\d.]+ s/step, "
                     r"[\d,]+ tokens/s, .* TFLOP/s model .*, MFU n/a \(CPU\)$", summary, re.M), summary

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
    # The later steps are the previous test's; --skip leaves them out, and says so.
    later = ("gpu_tests", "smoke", "attention", "infonce", "train_step")
    result = check("--dry-run", "--skip", ",".join(later), str(tmp_path / "out"), venv=tmp_path / "install")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "would install torch==" in (tmp_path / "out" / "install.log").read_text()
    assert not (tmp_path / "install").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert re.search(r"^\| install \| passed \| \d+ \|$", summary, re.M), summary
    for name in later:
        assert f"| {name} | skipped: --skip | 0 |" in summary, summary


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    for args, fragment in ((["--torch", "conda", str(tmp_path)], "--torch conda"),
                           (["--wheels", str(tmp_path / "none"), str(tmp_path)], "no such folder"),
                           (["--nope", str(tmp_path)], "unknown option --nope"),
                           (["--skip", "smoke,nope", str(tmp_path)], "--skip nope: no such step")):
        result = check(*args, timeout=30)
        assert result.returncode == 2 and fragment in result.stderr, (args, result.stderr)


def test_card_names_map_to_their_dense_bf16_peaks():
    """Names as torch.cuda.get_device_name() gives them; plain "H100" (the SXM card) is matched after PCIe and NVL."""
    from bench.gpu_train_step import peak_tflops

    cards = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
             "NVIDIA L40S": None}
    assert {card: peak_tflops(card) for card in cards} == cards
