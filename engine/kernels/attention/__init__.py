"""Varlen attention behind one function, whatever computes it.

    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=L, causal=True)

q (total, Hq, D), k/v (total, Hkv, D) with Hkv dividing Hq (grouped-query heads are the
backend's job, never the caller's), cu_seqlens int32 (n+1,) in flash-attn's varlen
layout. `return_lse=True` also returns the log-sum-exp (Hq, total) float32, natural
log, which ring attention needs to merge partial results. See dispatch.py for how the
backend is chosen and reference.py for the PyTorch spec.
"""
from engine.kernels.attention.dispatch import (
    attention,
    attention_block,
    attention_block_backward,
    register_block_backend,
    available_backends,
    get_default_backend,
    register_backend,
    resolve_backend,
    set_default_backend,
    use_backend,
    UnknownBackendError,
)

__all__ = [
    "attention",
    "attention_block",
    "attention_block_backward",
    "register_block_backend",
    "available_backends",
    "get_default_backend",
    "register_backend",
    "resolve_backend",
    "set_default_backend",
    "use_backend",
    "UnknownBackendError",
]
