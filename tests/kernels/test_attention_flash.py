"""engine/kernels/attention/flash.py against stand-ins for the flash-attn package (not installable here).

The stand-ins have the signatures and result layouts of flash-attn's functions in two
generations (2.5: window_size as a pair, a required block_table, 8-tuple forward results;
2.6+: window_size_left/right, softcap, 4-tuple results) and compute with block.py's math
spec, using flash-attn's convention of +inf as the LSE of a row that sees no key. What this
proves: the wrapper calls each generation with arguments it accepts (no sliding window, no
softcap, no dropout), picks out and lse from either result layout, turns +inf into block.py's
-inf and back for the backward, and gives the spec's out, lse and gradients through the
dispatcher, for plain attention and for ring attention's blocks. It cannot prove the CUDA kernels.
"""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from engine.kernels.attention import dispatch
from engine.kernels.attention.block import math_block_backward, math_block_forward
from engine.kernels.attention.reference import attention_reference
from tests.gpu import requires_gpu
from tests.kernels.test_attention_block import cu_seqlens

NO_WINDOW = (-1, -1)


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    out, lse = math_block_forward(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal,
                                  scale=softmax_scale)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))  # flash-attn's empty-row LSE


def _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    assert softmax_lse.dtype == torch.float32 and not (softmax_lse == float("-inf")).any(), "flash-attn wants +inf"
    lse = softmax_lse.masked_fill(softmax_lse == float("inf"), float("-inf"))
    grads = math_block_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                causal=causal, scale=softmax_scale)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    return dq, dk, dv, None


def _interface_2_5() -> types.ModuleType:
    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size, alibi_slopes, return_softmax, block_table):
        assert dropout_p == 0.0 and tuple(window_size) == NO_WINDOW and alibi_slopes is None and block_table is None
        out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        return out, q, k, v, out, lse, None, None

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                    alibi_slopes, deterministic, rng_state=None):
        assert dropout_p == 0.0 and tuple(window_size) == NO_WINDOW and alibi_slopes is None
        return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                         causal)

    return types.SimpleNamespace(_flash_attn_varlen_forward=_flash_attn_varlen_forward,
                                 _flash_attn_varlen_backward=_flash_attn_varlen_backward)


def _interface_2_6() -> types.ModuleType:
    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                                   alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                                   seqused_k=None):
        assert dropout_p == 0.0 and (window_size_left, window_size_right) == NO_WINDOW and softcap == 0.0
        out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        return out, lse, None, None

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                                    window_size_right, softcap, alibi_slopes, deterministic, rng_state=None,
                                    zero_tensors=False):
        assert dropout_p == 0.0 and (window_size_left, window_size_right) == NO_WINDOW and softcap == 0.0
        return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                         causal)

    return types.SimpleNamespace(_flash_attn_varlen_forward=_flash_attn_varlen_forward,
                                 _flash_attn_varlen_backward=_flash_attn_varlen_backward)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """The public function: differentiable out; (out, lse, S_dmask) with return_attn_probs (lse not differentiable)."""
    assert dropout_p == 0.0
    out = attention_reference(q, k, v, cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen_q, causal=causal,
                              scale=softmax_scale)
    if not return_attn_probs:
        return out
    _, lse = math_block_forward(q.detach(), k.detach(), v.detach(), cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, causal=causal, scale=softmax_scale)
    return out, lse, None


@pytest.fixture(params=["2.5", "2.6"])
def flash(request, monkeypatch):
    """engine.kernels.attention.flash with a stand-in flash_attn of one generation (it imports the package
    at each call, so the stand-in only has to be in sys.modules meanwhile)."""
    interface = _interface_2_5() if request.param == "2.5" else _interface_2_6()
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface = interface
    package.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    return importlib.import_module("engine.kernels.attention.flash")


def _stream(q_lengths, k_lengths, q_heads=4, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lengths), q_heads, dim, generator=generator)
    k, v = (torch.randn(sum(k_lengths), kv_heads, dim, generator=generator) for _ in range(2))
    dout = torch.randn(q.shape, generator=generator)
    return q, k, v, dout, cu_seqlens(q_lengths), cu_seqlens(k_lengths)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_blocks_equal_the_spec_with_empty_rows_at_minus_infinity(flash, causal):
    q_lengths, k_lengths = ([3, 5, 0, 4], [3, 5, 0, 4]) if causal else ([3, 0, 5, 2], [6, 4, 0, 2])
    q, k, v, dout, cq, ck = _stream(q_lengths, k_lengths)
    kwargs = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal, scale=0.3)
    out, lse = dispatch.attention_block(q, k, v, backend="flash_attn", **kwargs)
    want_out, want_lse = math_block_forward(q, k, v, **kwargs)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)  # -inf where a query has no key (sequence 2 of the bidirectional case)
    grads = dispatch.attention_block_backward(dout, q, k, v, out, lse, backend="flash_attn", **kwargs)
    for got, want in zip(grads, math_block_backward(dout, q, k, v, want_out, want_lse, **kwargs)):
        torch.testing.assert_close(got, want)


def test_plain_attention_through_the_dispatcher(flash):
    q, k, v, dout, cu, _ = _stream([1, 6, 3], [1, 6, 3])
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = dispatch.attention(*leaves, cu_seqlens=cu, max_seqlen=6, causal=True, backend="flash_attn",
                                  return_lse=True)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_leaves, cu_seqlens=cu, max_seqlen=6, causal=True, return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse.detach())
    for got, want in zip(grads, torch.autograd.grad(ref_out, ref_leaves, dout)):
        torch.testing.assert_close(got, want)


def test_a_too_old_flash_attn_lse_layout_is_one_clear_error(flash, monkeypatch):
    padded = lambda q, k, v, cq, ck, mq, mk, **kw: (q, torch.zeros(3, q.shape[1], mq), None)  # < 2.4: (b, h, L)
    monkeypatch.setattr(sys.modules["flash_attn"], "flash_attn_varlen_func", padded)
    q, k, v, _, cu, _ = _stream([2, 4], [2, 4])
    with pytest.raises(RuntimeError, match="install flash-attn >= 2.4"):
        flash.attention_flash(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=True, return_lse=True)


# --- the real package, on a GPU (bench/gpu/check.sh; flash-attn is not installable on the CPU machines) ---

@requires_gpu("needs a CUDA GPU with the flash-attn package installed", also=dispatch._installed("flash_attn"))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_real_flash_attn_matches_the_spec_in_bfloat16(causal):
    lengths = [1, 130, 77, 512]
    generator = torch.Generator().manual_seed(5)
    total = sum(lengths)
    cu = cu_seqlens(lengths).cuda()
    q = torch.randn(total, 8, 128, generator=generator).to("cuda", torch.bfloat16)
    k, v = (torch.randn(total, 2, 128, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))
    dout = torch.randn(q.shape, generator=generator).to("cuda", torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = dispatch.attention(*leaves, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal,
                                  backend="flash_attn", return_lse=True)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_leaves, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal,
                                           return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.float())
    # bfloat16 keeps 8 bits of mantissa: 3e-2 is a few ulps of values of order 1.
    torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse.float(), ref_lse, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
