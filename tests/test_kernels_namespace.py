"""Hugging Face's `kernels` and ours live side by side in one process.

transformers (5.25+) requires Hugging Face's package `kernels` and imports it while loading model
configs; ours is `engine.kernels`, so the top-level name stays theirs whatever the working
directory or launcher: `python` started in the repository root (its folder first on sys.path),
`torchrun`, another folder, and this pytest process itself (pytest.ini puts the root on sys.path).
Each run imports theirs (CUDAProperties is there), runs a tiny transformers Llama, and runs our
attention and InfoNCE kernels against their references.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import os
import kernels                        # Hugging Face's, imported first on purpose
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from engine.kernels.attention import attention
from engine.kernels.attention.reference import attention_reference
from engine.kernels.infonce import candidate_lse, candidate_lse_reference


def check_side_by_side():
    from kernels import CUDAProperties  # noqa: F401  (the name transformers' hub integration imports)

    site = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
    assert os.path.basename(site) in ("site-packages", "dist-packages"), kernels.__file__

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (2, 5))).logits
    assert logits.shape == (2, 5, 64) and torch.isfinite(logits).all()

    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    got = attention(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=True)
    torch.testing.assert_close(got, attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=True))

    queries, docs = torch.randn(3, 16), torch.randn(9, 16)
    positive = torch.tensor([0, 3, 6])
    torch.testing.assert_close(candidate_lse(queries, docs, positive, temperature=0.05, backend="torch"),
                               candidate_lse_reference(queries, docs, positive, temperature=0.05))
    return transformers.__version__


if __name__ == "__main__":
    print("ok", check_side_by_side())
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "side_by_side.py"
    path.write_text(SCRIPT)
    return path


def run(command, cwd):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok " in result.stdout, result.stdout


def test_python_started_in_the_repository_root():
    """`python -c` puts the working directory first on sys.path: the repository root here."""
    run([sys.executable, "-c", SCRIPT], cwd=REPO)


def test_python_started_elsewhere(script, tmp_path):
    run([sys.executable, str(script)], cwd=tmp_path)


def test_torchrun_from_the_repository_root(script):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)], cwd=REPO)


def test_this_pytest_process():
    namespace: dict = {}
    exec(compile(SCRIPT, "side_by_side", "exec"), namespace)
    namespace["check_side_by_side"]()


def test_no_top_level_package_of_ours_is_called_kernels():
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))
