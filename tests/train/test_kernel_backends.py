"""kernels.infonce and kernels.attention through the real entry point: the engine trains to the
same losses whichever backend computes them.

The Triton kernels run here under TRITON_INTERPRET=1 (CPU, slow: the tiny experiment, 2 steps
of 4 queries). Compared with the PyTorch backends in one plain process (relative 1e-4, the
issue's bar; measured ~1e-6):
- one process, kernels.attention=triton and kernels.infonce=triton: every layer's attention
  and the loss through the Triton kernels;
- ring 2 on two torchrun ranks, kernels.attention=triton: ring attention's per-block calls go
  through the same dispatcher, so switching the backend moves nothing beyond tolerance.
Also: a backend that cannot run on this machine fails at startup with one line naming the key
(through the CLI where this machine can show it; every other refusal through select_kernels).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.conftest import synthetic_examples, write_jsonl
from tests.parallel.test_launch import _env, assert_same_losses, launch, losses
from tests.test_cli import assert_one_line_error

# Short queries and documents: Triton's interpreter runs each kernel block in Python.
RUN = ["+exp=tiny", "data.eval=", "train.save_final=false", "train.max_steps=2", "train.batch_size=4",
       "data.query_max_len=32", "data.doc_max_len=16"]
TORCH = ["kernels.attention=sdpa", "kernels.infonce=torch"]
TRITON = ["kernels.attention=triton", "kernels.infonce=triton"]


def _train(tmp_path, name: str, nproc: int, *overrides: str, interpret: bool = False) -> str:
    run_dir = str(tmp_path / name)
    env = _env(TRITON_INTERPRET="1") if interpret else _env()
    result = launch(nproc, *RUN, f"train.output_dir={run_dir}", *overrides, env=env)
    assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return run_dir


def test_triton_kernels_train_to_the_torch_losses_in_one_process_and_in_a_ring(tmp_path):
    reference = losses(_train(tmp_path, "torch", 0, *TORCH))
    assert_same_losses(losses(_train(tmp_path, "triton", 0, *TRITON, interpret=True)), reference)
    ring = losses(_train(tmp_path, "ring2-triton", 2, "parallel.ring=2", *TRITON, interpret=True))
    assert_same_losses(ring, reference)


def test_a_backend_this_machine_cannot_run_is_one_line_at_startup(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_examples(4))
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    for key in ("kernels.infonce", "kernels.attention"):
        result = launch(0, f"data.train={data}", f"train.output_dir={tmp_path / 'r'}", f"{key}=triton", env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert_one_line_error(result, f"{key}=triton needs a CUDA device")
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")


def _installed(*packages: str):
    """importlib.util.find_spec as if exactly `packages` (of triton, flash_attn) were installed."""
    real = importlib.util.find_spec
    return lambda name, *a: (object() if name in packages else None) if name in ("triton", "flash_attn") \
        else real(name, *a)


def test_each_backend_a_device_cannot_run_is_refused_and_the_defaults_stay(monkeypatch):
    from engine.config import ConfigError, KernelsConfig
    from engine.kernels.select import select_kernels
    from engine.kernels.attention import dispatch, get_default_backend
    from engine.kernels.infonce import get_infonce_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cases = [  # (installed packages, device, config, what the one line says)
        ((), cuda, KernelsConfig(infonce="triton"), "kernels.infonce=triton: the triton package is not installed"),
        ((), cuda, KernelsConfig(attention="triton"), "kernels.attention=triton: the triton package is not installed"),
        (("triton",), cuda, KernelsConfig(attention="flash_attn"),
         "kernels.attention=flash_attn: the flash-attn package is not installed"),
        (("triton", "flash_attn"), cpu, KernelsConfig(attention="flash_attn"),
         "kernels.attention=flash_attn needs a CUDA device (this run is on cpu)"),
    ]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = get_default_backend(), get_infonce_backend()
    for packages, device, cfg, says in cases:
        monkeypatch.setattr(importlib.util, "find_spec", _installed(*packages))
        with pytest.raises(ConfigError) as error:
            select_kernels(cfg, device)
        assert says in str(error.value) and "\n" not in str(error.value)
        assert (get_default_backend(), get_infonce_backend()) == before
    monkeypatch.setattr(importlib.util, "find_spec", _installed("triton", "flash_attn"))
    dispatch._installed.cache_clear()  # 'auto' remembers what it found installed
    assert select_kernels(KernelsConfig(), cuda) == {"infonce": "triton", "attention": "flash_attn"}
    monkeypatch.undo()
    dispatch._installed.cache_clear()
    assert select_kernels(KernelsConfig(), cpu) == {"infonce": "torch", "attention": "torch"}
