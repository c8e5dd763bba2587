"""Which function computes attention: a registry of named backends and the 'auto' rule.

The model calls `attention(...)` and never names a backend; the run picks one with
`set_default_backend(cfg.kernels.attention)` (engine/kernels/select.py; `with use_backend(name):` in a test).
A backend is any function with attention_reference's signature, plus optionally the per-block
pair ring attention uses (block.py's contract). Backends register as "module:function" and
are imported on first use only, so a missing optional package costs nothing until someone
asks for it, and then one line names it.

    torch, sdpa   reference.py (PyTorch SDPA per length bucket) and block.py: CPU, any device
    triton        triton.py: FlashAttention-2 kernels (GPU, or CPU under TRITON_INTERPRET=1)
    flash_attn    flash.py: the flash-attn package (CUDA, float16/bfloat16)

'auto' takes, for the device of q, the first backend in _AUTO_PREFERENCE whose package is
importable (checked without importing it): flash_attn, then triton, then torch on CUDA;
torch on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from typing import Callable, Iterator

from torch import Tensor

AttentionFn = Callable[..., "Tensor | tuple[Tensor, Tensor]"]


class UnknownBackendError(ValueError):
    """An attention backend name that nothing registered."""


# name -> the function, or "module:function" until it is first used
_REGISTRY: dict[str, AttentionFn | str] = {
    "torch": "engine.kernels.attention.reference:attention_reference",
    "sdpa": "engine.kernels.attention.reference:attention_reference",  # the name configs use for PyTorch's SDPA
    "triton": "engine.kernels.attention.triton:attention_triton",
    "flash_attn": "engine.kernels.attention.flash:attention_flash",
}
# name -> the top-level package it needs; 'auto' skips a backend whose package is not installed
_REQUIRES: dict[str, str] = {"triton": "triton", "flash_attn": "flash_attn"}
# device type -> backends 'auto' tries in order (only registered ones whose package is installed count)
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("flash_attn", "triton", "torch"),
    "cpu": ("torch",),
}
# name -> (block forward, block backward): per-block attention with its LSE, for ring attention
# (see block.py); a backend without an entry cannot serve ring attention.
_BLOCK_REGISTRY: dict[str, tuple[Callable | str, Callable | str]] = {
    "torch": ("engine.kernels.attention.block:block_forward", "engine.kernels.attention.block:block_backward"),
    "sdpa": ("engine.kernels.attention.block:block_forward", "engine.kernels.attention.block:block_backward"),
    "triton": ("engine.kernels.attention.triton:block_forward", "engine.kernels.attention.triton:block_backward"),
    "flash_attn": ("engine.kernels.attention.flash:block_forward", "engine.kernels.attention.flash:block_backward"),
}
_default_backend = "auto"


def register_backend(name: str, fn: AttentionFn | str, requires: str | None = None) -> None:
    """Add or replace a backend; `fn` may be "package.module:function" to import lazily, and
    `requires` names the package without which 'auto' passes it over."""
    if name == "auto":
        raise ValueError("attention backend name 'auto' is reserved for the automatic choice")
    _REGISTRY[name] = fn
    if requires is not None:
        _REQUIRES[name] = requires


def available_backends() -> list[str]:
    """Registered backend names (a lazily registered one may still fail to import)."""
    return sorted(_REGISTRY)


def set_default_backend(name: str) -> None:
    """The backend `attention(..., backend="auto")` uses; "auto" restores the automatic choice."""
    global _default_backend
    _check_name(name)
    _default_backend = name


def get_default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily make `name` the default backend."""
    previous = get_default_backend()
    set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(previous)


def resolve_backend(name: str, device_type: str) -> str:
    """The concrete backend name `name` stands for on a device of type `device_type`."""
    _check_name(name)
    if name == "auto":
        name = _default_backend
    if name != "auto":
        return name
    for candidate in _AUTO_PREFERENCE.get(device_type, ("torch",)):
        if candidate in _REGISTRY and _installed(_REQUIRES.get(candidate)):
            return candidate
    return "torch"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Varlen attention: q (total, Hq, D), k/v (total, Hkv, D) -> out (total, Hq, D) [, lse (Hq, total) fp32]."""
    fn = _load(resolve_backend(backend, q.device.type))
    return fn(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal, scale=scale, return_lse=return_lse)


def register_block_backend(name: str, forward: Callable | str, backward: Callable | str) -> None:
    """Add or replace the per-block (ring) functions of backend `name`; see block.py for the contract."""
    _BLOCK_REGISTRY[name] = (forward, backward)


def attention_block(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto", **kwargs) -> tuple[Tensor, Tensor]:
    """One query block against one key block: (out (Tq, Hq, D), lse (Hq, Tq) fp32); see block.py."""
    return _load_block(resolve_backend(backend, q.device.type), 0)(q, k, v, **kwargs)


def attention_block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                             backend: str = "auto", **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block given the final merged out and lse; see block.py."""
    return _load_block(resolve_backend(backend, q.device.type), 1)(dout, q, k, v, out, lse, **kwargs)


def _load(name: str) -> AttentionFn:
    target = _REGISTRY[name]
    if isinstance(target, str):
        target = _import(name, target)
        _REGISTRY[name] = target
    return target


def _load_block(name: str, which: int) -> Callable:
    if name not in _BLOCK_REGISTRY:
        raise UnknownBackendError(f"attention backend {name!r} has no per-block functions, so ring attention "
                                  f"cannot use it; ones that have: {', '.join(sorted(_BLOCK_REGISTRY))}")
    pair = list(_BLOCK_REGISTRY[name])
    if isinstance(pair[which], str):
        pair[which] = _import(name, pair[which])
        _BLOCK_REGISTRY[name] = tuple(pair)
    return pair[which]


def _import(name: str, target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise UnknownBackendError(f"attention backend {name!r} could not be imported ({e})") from e


@functools.lru_cache(maxsize=None)
def _installed(package: str | None) -> bool:
    """Whether `package` could be imported, without importing it (triton alone takes seconds)."""
    return package is None or importlib.util.find_spec(package) is not None


def _check_name(name: str) -> None:
    if name != "auto" and name not in _REGISTRY:
        raise UnknownBackendError(
            f"unknown attention backend {name!r}; registered: auto, {', '.join(available_backends())}"
        )
