"""flash-attn (Dao-AILab, CUDA) as an attention backend, imported only when someone chooses it.

    attention_flash(q, k, v, cu_seqlens=cu, max_seqlen=L, causal=True, return_lse=True)
    block_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=False)          # ring attention
    block_backward(dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=False)

`attention_flash` is `flash_attn_varlen_func` with reference.py's signature. Its LSE output is
not differentiable: flash-attn's autograd Function drops the LSE's gradient (ring attention
never needs it; the 'torch' and 'triton' backends do differentiate it).

The block functions call flash-attn's varlen forward and backward directly
(`_flash_attn_varlen_forward` / `_flash_attn_varlen_backward`, what ring-flash-attention uses).
They are private and their signatures moved between releases (window_size as a pair until
2.6, then two ints; softcap from 2.6; custom ops from 2.6.3), so arguments are passed by
name, filtered by the installed function's signature. flash-attn writes +inf as the LSE of a
row with no keys; block.py's contract wants -inf, and the backward wants +inf back.

flash-attn is not installed on the development machine: tests/kernels/test_attention_flash.py
runs this file against stand-ins with the signatures of flash-attn 2.5 and 2.6+ (computing with
the math spec), which checks the calls, the LSE conventions and the result layouts, not the CUDA
kernels; the Triton backend is the tested GPU path.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from engine.kernels.attention.dispatch import UnknownBackendError


def _flash_attn():
    """flash-attn's interface module and varlen function, imported at first use: the package is
    optional and CUDA-only, so nothing imports it until this backend runs."""
    try:
        from flash_attn import flash_attn_interface, flash_attn_varlen_func
    except ImportError as e:
        raise UnknownBackendError(f"attention backend 'flash_attn' needs the flash-attn package "
                                  f"(pip install flash-attn --no-build-isolation): {e}") from None
    return flash_attn_interface, flash_attn_varlen_func


def attention_flash(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int | None, causal: bool,
    scale: float | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """reference.attention_reference's signature; flash-attn needs float16/bfloat16 CUDA tensors."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen = _max_seqlen(cu, max_seqlen)
    _, varlen_func = _flash_attn()
    result = varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale,
                                    causal=causal, return_attn_probs=return_lse)
    if not return_lse:
        return result
    out, lse = result[0], result[1]
    if lse.shape != (q.shape[1], q.shape[0]):  # flash-attn < 2.4 padded it to (batch, heads, max_seqlen)
        raise RuntimeError(f"flash_attn backend: softmax_lse has shape {tuple(lse.shape)}, expected (heads, tokens) "
                           f"{(q.shape[1], q.shape[0])}; install flash-attn >= 2.4")
    return out, lse


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None, causal: bool, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """-> out (Tq, Hq, D), lse (Hq, Tq) float32, -inf where a row has no keys (block.py's contract)."""
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32) for c in (cu_seqlens_q, cu_seqlens_k))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    interface, _ = _flash_attn()
    result = _call(interface._flash_attn_varlen_forward, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                   max_seqlen_q=_max_seqlen(cu_q, max_seqlen_q), max_seqlen_k=_max_seqlen(cu_k, max_seqlen_k),
                   dropout_p=0.0, softmax_scale=scale, causal=causal, return_softmax=False)
    # >= 2.6: (out, lse, S_dmask, rng_state); before: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
    out, lse = (result[0], result[1]) if len(result) == 4 else (result[0], result[5])
    return out, lse.masked_fill(lse == float("inf"), float("-inf"))


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients given the final (merged) out and lse of the query rows; block.py's contract."""
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32) for c in (cu_seqlens_q, cu_seqlens_k))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.float().masked_fill(lse == float("-inf"), float("inf")).contiguous()  # P = exp(S - inf) = 0
    interface, _ = _flash_attn()
    _call(interface._flash_attn_varlen_backward, dout=dout.to(q.dtype).contiguous(), q=q, k=k, v=v,
          out=out.to(q.dtype).contiguous(), softmax_lse=lse, dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu_q,
          cu_seqlens_k=cu_k, max_seqlen_q=_max_seqlen(cu_q, max_seqlen_q), max_seqlen_k=_max_seqlen(cu_k, max_seqlen_k),
          dropout_p=0.0, softmax_scale=scale, causal=causal, deterministic=False, rng_state=None)
    return dq, dk, dv


def _call(fn, **kwargs):
    """Call a flash-attn internal with the arguments its installed version takes, defaults for the rest;
    a required argument this file does not know (block_table in 2.5: paged KV) is given None."""
    signature = inspect.signature(getattr(fn, "_init_fn", fn))  # a torch custom op wraps the Python function
    params = signature.parameters
    for name, param in params.items():
        if param.default is inspect.Parameter.empty and name not in kwargs:
            kwargs[name] = None
    if "window_size" in params:
        kwargs["window_size"] = (-1, -1)
    if "window_size_left" in params:
        kwargs.update(window_size_left=-1, window_size_right=-1)
    if "softcap" in params:
        kwargs["softcap"] = 0.0
    if "alibi_slopes" in params:
        kwargs["alibi_slopes"] = None
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def _max_seqlen(cu: Tensor, given: int | None) -> int:
    if given is not None:
        return int(given)
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
