"""kernels.infonce and kernels.attention: set the dispatchers' defaults once per run, and check
that the choice can run on this device before any model is built (one line naming the key).

    select_kernels(cfg.kernels, device)   # -> {"infonce": "torch", "attention": "sdpa"}, as resolved

Every layer, ring attention's blocks and the InfoNCE loss call the dispatchers with
backend="auto", so this is the only place a run names a backend.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from engine.config import ConfigError, KernelsConfig


def select_kernels(cfg: KernelsConfig, device: torch.device) -> dict[str, str]:
    """Make cfg's backends the defaults; return what each resolves to on `device`. A choice that
    cannot run here raises ConfigError and leaves the previous defaults in place."""
    from engine.kernels.attention import UnknownBackendError, get_default_backend, set_default_backend
    from engine.kernels.attention import resolve_backend as resolve_attention
    from engine.kernels.infonce import get_infonce_backend, set_infonce_backend
    from engine.kernels.infonce import resolve_backend as resolve_infonce

    previous = get_default_backend(), get_infonce_backend()
    try:
        try:
            set_default_backend(cfg.attention)
        except UnknownBackendError as err:
            raise ConfigError(f"kernels.attention={cfg.attention!r}: {err}") from None
        set_infonce_backend(cfg.infonce)
        # resolve_infonce refuses Triton on CPU with a RuntimeError; _check_runnable says it as config.
        chosen = {"infonce": resolve_infonce("auto", device.type) if cfg.infonce == "auto" else cfg.infonce,
                  "attention": resolve_attention("auto", device.type)}
        for key, backend in chosen.items():
            _check_runnable(f"kernels.{key}", backend, device)
    except ConfigError:
        set_default_backend(previous[0])
        set_infonce_backend(previous[1])
        raise
    return chosen


def _check_runnable(key: str, backend: str, device: torch.device) -> None:
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError(f"{key}=triton: the triton package is not installed (it ships with CUDA builds "
                              "of torch); use auto or the PyTorch backend")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"{key}=triton needs a CUDA device (this run is on {device.type}; "
                              "TRITON_INTERPRET=1 runs it on CPU, slowly, for tests)")
    if backend == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(f"{key}=flash_attn: the flash-attn package is not installed "
                              "(pip install flash-attn); auto picks Triton without it")
        if device.type != "cuda":
            raise ConfigError(f"{key}=flash_attn needs a CUDA device (this run is on {device.type})")
