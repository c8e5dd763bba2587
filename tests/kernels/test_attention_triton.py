"""The Triton FlashAttention-2 kernels (engine/kernels/attention/triton.py) against the PyTorch spec.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set below, before triton
is imported), with tiny shapes and 16 x 16 tiles: the interpreter runs every program instance in
Python. With a GPU the same tests run natively, and the GPU-only ones (bfloat16, head dims
64/128/256 at sequence lengths up to 1024 with autotuned tiles) run too.

The stories, each against an independent reference:
- plain varlen attention equals reference.py (out, lse, and dq/dk/dv including the lse's own
  gradient): causal and bidirectional, lengths 1 to 35 across tile edges, GQA ratios 1, 4, 8;
  the models' head dims 64, 128 and 256 on short sequences;
- blocks with different query and key lengths, empty segments included, equal the float64
  textbook of test_attention_block.py; causal blocks with Lq < Lk are the last Lq rows of causal
  attention over Lk tokens (bottom-right alignment);
- key blocks merged through their LSE give whole attention, and each block's backward given the
  merged out and lse gives its share of the gradient (ring attention's identity);
- ring attention's own block plan on a two-rank split, run in one process, equals whole attention;
- the dispatcher: 'triton' and 'sdpa' by name, 'auto' on CUDA, flash_attn's missing package in
  one line, and importing kernels.attention imports no triton.

Tolerances: float32 1e-5 relative and absolute (attention over <= 35 keys of order-one values
keeps ~1e-6; a masking, pairing or head-grouping mistake is an order-one error). float16 2e-3
against float32 math on the same rounded inputs: outputs and gradients are rounded to float16
(2^-11 ~ 4.9e-4 relative) and P, dS are rounded to float16 before their products, as in FA2.
bfloat16 (GPU only) keeps ~3 significant digits: 3e-2.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:  # must precede the first import of triton: @triton.jit reads it when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.parallel import ring  # noqa: E402
from engine.parallel.context import shard_for_ring  # noqa: E402
from engine.kernels.attention import UnknownBackendError, attention, attention_block, attention_block_backward  # noqa: E402
from engine.kernels.attention import dispatch  # noqa: E402
from engine.kernels.attention.block import math_block_backward  # noqa: E402
from engine.kernels.attention.reference import attention_reference  # noqa: E402
from engine.kernels.attention.triton import attention_triton, block_backward, block_forward  # noqa: E402
from tests.gpu import requires_gpu  # noqa: E402
from tests.kernels.test_attention_block import block_kwargs, cu_seqlens, halves, merge, textbook_block  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
TILES = dict(block_m=16, block_n=16)  # tl.dot's smallest tile: the fewest interpreted instructions
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
needs_gpu = requires_gpu("needs a CUDA GPU: bfloat16 (wrong in the interpreter), and "
                         "autotuned tiles at lengths too slow for the interpreter")


def rand(rows: int, heads: int, dim: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, heads, dim, generator=generator).to(dtype=dtype, device=DEVICE)


def on_device(kwargs: dict) -> dict:
    return {name: value.to(DEVICE) if torch.is_tensor(value) else value for name, value in kwargs.items()}


def assert_close(got, want, dtype, what):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# --- plain varlen attention against reference.py ------------------------------------------------

LENGTHS = [1, 18, 5, 33]  # a length-1 sequence, unequal lengths, and ones crossing 16-row tiles


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype, q_heads, kv_heads, head_dim", [
    (torch.float32, 2, 2, 16),  # GQA ratio 1
    (torch.float32, 4, 1, 32),  # ratio 4
    (torch.float32, 8, 1, 16),  # ratio 8
    (torch.float16, 4, 1, 16),
    (torch.float16, 2, 2, 24),  # a head dim that is not a power of two: padded and masked to 32
], ids=["fp32-gqa1", "fp32-gqa4-d32", "fp32-gqa8", "fp16-gqa4", "fp16-gqa1-d24"])
def test_attention_matches_reference(causal, dtype, q_heads, kv_heads, head_dim):
    generator = torch.Generator().manual_seed(q_heads * 100 + head_dim)
    total, cu = sum(LENGTHS), cu_seqlens(LENGTHS).to(DEVICE)
    q, grad = rand(total, q_heads, head_dim, generator, dtype), rand(total, q_heads, head_dim, generator, dtype)
    k, v = rand(total, kv_heads, head_dim, generator, dtype), rand(total, kv_heads, head_dim, generator, dtype)
    grad_lse = torch.randn(q_heads, total, generator=generator).to(DEVICE)  # the LSE is differentiable too

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention_triton(*leaves, cu_seqlens=cu, max_seqlen=max(LENGTHS), causal=causal, return_lse=True,
                                **TILES)
    grads = torch.autograd.grad([out, lse], leaves, [grad, grad_lse])

    ref_leaves = [t.float().requires_grad_(True) for t in (q, k, v)]  # float32 math on the same rounded inputs
    ref_out, ref_lse = attention_reference(*ref_leaves, cu_seqlens=cu, max_seqlen=max(LENGTHS), causal=causal,
                                           return_lse=True)
    ref_grads = torch.autograd.grad([ref_out, ref_lse], ref_leaves, [grad.float(), grad_lse])

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (q_heads, total)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype, f"d{name} is {got.dtype}"
        assert_close(got, want, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_model_head_dims_match_reference(head_dim, dtype):
    """The head dims of the supported families (Llama/Mistral/Qwen 128, small models 64, some 256),
    causal with GQA 2 on two short sequences: a head-dim tiling mistake is an order-one error."""
    lengths = [3, 17]
    generator = torch.Generator().manual_seed(head_dim)
    total, cu = sum(lengths), cu_seqlens(lengths).to(DEVICE)
    q, grad = rand(total, 2, head_dim, generator, dtype), rand(total, 2, head_dim, generator, dtype)
    k, v = rand(total, 1, head_dim, generator, dtype), rand(total, 1, head_dim, generator, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_triton(*leaves, cu_seqlens=cu, max_seqlen=max(lengths), causal=True, **TILES)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref_out = attention_reference(*ref_leaves, cu_seqlens=cu, max_seqlen=max(lengths), causal=True)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.float())
    assert_close(out, ref_out, dtype, "out")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, dtype, f"d{name}")


def test_out_alone_is_differentiable_and_matches():
    """return_lse=False: the lse is not an output, so the backward gets no lse gradient (None)."""
    generator = torch.Generator().manual_seed(7)
    lengths = [9, 20]
    cu = cu_seqlens(lengths).to(DEVICE)
    q, k, v, grad = (rand(sum(lengths), 2, 16, generator) for _ in range(4))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_triton(*leaves, cu_seqlens=cu, max_seqlen=None, causal=True, **TILES)  # max_seqlen measured
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out = attention_reference(*ref_leaves, cu_seqlens=cu, max_seqlen=20, causal=True)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad)
    assert_close(out, ref_out, torch.float32, "out")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, torch.float32, f"d{name}")


# --- per-block functions (ring attention's unit) ------------------------------------------------

def test_blocks_with_different_query_and_key_lengths():
    q_lengths = [3, 0, 5, 2, 20, 1]  # an empty query part; 20 rows cross a tile edge
    k_lengths = [6, 4, 0, 2, 17, 1]  # an empty key part: its queries see nothing, out 0 and lse -inf
    scale = 0.3
    generator = torch.Generator().manual_seed(1)
    q, grad = rand(sum(q_lengths), 4, 8, generator), rand(sum(q_lengths), 4, 8, generator)
    k, v = rand(sum(k_lengths), 2, 8, generator), rand(sum(k_lengths), 2, 8, generator)

    leaves = [t.cpu().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = textbook_block(*leaves, q_lengths, k_lengths, scale)
    (ref_out * grad.cpu().double()).sum().backward()

    kwargs = on_device(dict(block_kwargs(q_lengths, k_lengths, causal=False), scale=scale, **TILES))
    out, lse = block_forward(q, k, v, **kwargs)
    no_keys = slice(3, 8)  # the queries of sequence 2
    assert (out[no_keys] == 0).all() and (lse[:, no_keys] == -math.inf).all()
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    grads = block_backward(grad, q, k, v, out, lse, **kwargs)
    assert (grads[0][no_keys] == 0).all(), "rows without keys (lse -inf) get zero gradient, not NaN"
    for name, got, leaf in zip("qkv", grads, leaves):
        assert_close(got, leaf.grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_blocks_with_an_offset_are_bottom_right_aligned(dtype):
    """Queries fewer than keys are the *last* queries of the keys' sequence: they equal the last
    rows of causal attention over the whole sequence, and so do their key gradients."""
    k_lengths = [7, 1, 35, 4, 5]
    q_lengths = [3, 1, 20, 0, 5]  # offsets 4, 0, 15; a sequence with keys but no queries; one diagonal block
    generator = torch.Generator().manual_seed(2)
    q_full, grad_full = (rand(sum(k_lengths), 4, 16, generator, dtype) for _ in range(2))
    k, v = rand(sum(k_lengths), 2, 16, generator, dtype), rand(sum(k_lengths), 2, 16, generator, dtype)
    starts = cu_seqlens(k_lengths).tolist()
    rows = torch.tensor([starts[i + 1] - n + j for i, n in enumerate(q_lengths) for j in range(n)], device=DEVICE)
    upstream = torch.zeros_like(grad_full)
    upstream[rows] = grad_full[rows]  # only the block's queries have an output

    leaves = [t.float().requires_grad_(True) for t in (q_full, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, cu_seqlens=cu_seqlens(k_lengths).to(DEVICE),
                                           max_seqlen=max(k_lengths), causal=True, return_lse=True)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, leaves, upstream.float())

    kwargs = on_device(dict(block_kwargs(q_lengths, k_lengths, causal=True), **TILES))
    q = q_full[rows]
    out, lse = block_forward(q, k, v, **kwargs)
    assert_close(out, ref_out[rows], dtype, "out")
    assert_close(lse, ref_lse[:, rows], dtype, "lse")
    dq, dk, dv = block_backward(grad_full[rows], q, k, v, out, lse, **kwargs)
    assert_close(dq, ref_dq[rows], dtype, "dq")
    assert_close(dk, ref_dk, dtype, "dk")  # keys that no query sees (sequence 3) get exact zeros
    assert_close(dv, ref_dv, dtype, "dv")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_block_backward_uses_the_out_and_lse_it_is_given(causal):
    """Ring attention hands each block the merged out and lse: feed a random out, an lse above the
    block's own, and one -inf (a row that, overall, attended nothing) on a row that has keys here;
    the math spec of block.py is the reference, and that row must get zeros, not NaN."""
    q_lengths = [9, 3, 20]
    k_lengths = q_lengths if causal else [5, 3, 17]
    generator = torch.Generator().manual_seed(8)
    q, grad, final_out = (rand(sum(q_lengths), 4, 16, generator) for _ in range(3))
    k, v = rand(sum(k_lengths), 2, 16, generator), rand(sum(k_lengths), 2, 16, generator)
    kwargs = on_device(block_kwargs(q_lengths, k_lengths, causal))

    _, lse = block_forward(q, k, v, **kwargs, **TILES)
    final_lse = lse + torch.rand(lse.shape, generator=generator).to(DEVICE)  # other blocks added mass
    final_lse[1, 12] = -math.inf
    grads = block_backward(grad, q, k, v, final_out, final_lse, **kwargs, **TILES)
    spec = math_block_backward(grad, q, k, v, final_out, final_lse, **kwargs)
    assert (grads[0][12, 1] == 0).all(), "a row with lse -inf gets zero gradient"
    for name, got, want in zip("qkv", grads, spec):
        assert torch.isfinite(got).all(), f"d{name} has NaN or inf"
        assert_close(got, want, torch.float32, f"d{name}")


def test_causal_block_with_more_queries_than_keys_leaves_the_first_rows_empty():
    """Lq > Lk: bottom-right alignment gives the first Lq - Lk queries no key (out 0, lse -inf)."""
    generator = torch.Generator().manual_seed(3)
    q, grad = rand(6, 2, 16, generator), rand(6, 2, 16, generator)
    k, v = rand(4, 2, 16, generator), rand(4, 2, 16, generator)
    kwargs = on_device(dict(block_kwargs([6], [4], causal=True), **TILES))
    out, lse = block_forward(q, k, v, **kwargs)
    assert (out[:2] == 0).all() and (lse[:, :2] == -math.inf).all()
    ref_out, ref_lse = attention_reference(q[2:], k, v, cu_seqlens=cu_seqlens([4]).to(DEVICE), max_seqlen=4,
                                           causal=True, return_lse=True)
    assert_close(out[2:], ref_out, torch.float32, "out")
    assert_close(lse[:, 2:], ref_lse, torch.float32, "lse")
    dq, dk, dv = block_backward(grad, q, k, v, out, lse, **kwargs)
    assert (dq[:2] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_causal_key_blocks_merge_into_whole_attention():
    """Ring attention's causal pattern on two halves A, B of each sequence: A attends A (diagonal),
    B attends A (whole block) and B (diagonal); each backward is given the merged out and lse."""
    lengths = [7, 1, 24, 6]  # the 1-token sequence has an empty first half
    first, second, rows_a, rows_b = halves(lengths)
    rows_a, rows_b = rows_a.to(DEVICE), rows_b.to(DEVICE)
    generator = torch.Generator().manual_seed(4)
    q, grad = rand(sum(lengths), 4, 16, generator), rand(sum(lengths), 4, 16, generator)
    k, v = rand(sum(lengths), 1, 16, generator), rand(sum(lengths), 1, 16, generator)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, cu_seqlens=cu_seqlens(lengths).to(DEVICE),
                                           max_seqlen=max(lengths), causal=True, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad)

    qa, ka, va, ga = q[rows_a], k[rows_a], v[rows_a], grad[rows_a]
    qb, kb, vb, gb = q[rows_b], k[rows_b], v[rows_b], grad[rows_b]
    aa = on_device(dict(block_kwargs(first, first, causal=True), **TILES))
    ba = on_device(dict(block_kwargs(second, first, causal=False), **TILES))
    bb = on_device(dict(block_kwargs(second, second, causal=True), **TILES))
    out_a, lse_a = block_forward(qa, ka, va, **aa)
    out_b, lse_b = merge(*block_forward(qb, ka, va, **ba), *block_forward(qb, kb, vb, **bb))
    assert_close(out_a, ref_out[rows_a], torch.float32, "out A")
    assert_close(out_b, ref_out[rows_b], torch.float32, "out B")
    assert_close(lse_b, ref_lse[:, rows_b], torch.float32, "lse B")

    dq_aa, dk_aa, dv_aa = block_backward(ga, qa, ka, va, out_a, lse_a, **aa)
    dq_ba, dk_ba, dv_ba = block_backward(gb, qb, ka, va, out_b, lse_b, **ba)
    dq_bb, dk_bb, dv_bb = block_backward(gb, qb, kb, vb, out_b, lse_b, **bb)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq[rows_a], dq[rows_b] = dq_aa, dq_ba + dq_bb
    dk[rows_a], dk[rows_b] = dk_aa + dk_ba, dk_bb
    dv[rows_a], dv[rows_b] = dv_aa + dv_ba, dv_bb
    for name, got, want in zip("qkv", (dq, dk, dv), ref_grads):
        assert_close(got, want, torch.float32, f"d{name}")


# --- ring attention's block plan, two ranks simulated in one process ----------------------------

def ring_in_one_process(q, k, v, grad, cu, causal, world):
    """engine.parallel.ring's forward and backward with the K/V passing replaced by indexing: rank r
    at step s attends the block of rank (r - s) mod world, through the dispatcher's 'triton' blocks.
    -> per rank: (shard, out, dq, dk, dv), dk/dv already summed at their owner."""
    shards = [shard_for_ring(cu.cpu(), world, r, causal) for r in range(world)]
    local = [[t[s.index.clamp(min=0).to(DEVICE)] for t in (q, k, v, grad)] for s in shards]
    for s, parts in zip(shards, local):
        parts[3][(s.index < 0).to(DEVICE)] = 0  # pads have no output, hence no upstream gradient
    plans = [ring._plan_blocks(s.cu_seqlens.to(DEVICE), s.seq_lens.to(DEVICE), world, r, causal)
             for r, s in enumerate(shards)]
    scale = q.shape[-1] ** -0.5
    results = []
    for r in range(world):
        q_r = local[r][0]
        out = torch.zeros(q_r.shape, dtype=torch.float32, device=DEVICE)
        lse = torch.full((q_r.shape[1], q_r.shape[0]), -math.inf, device=DEVICE)
        for src in range(world):
            block = plans[r][src]
            k_src, v_src = local[src][1], local[src][2]
            out_b, lse_b = attention_block(ring._rows(q_r, block.q_rows), ring._rows(k_src, block.k_rows),
                                           ring._rows(v_src, block.k_rows), backend="triton",
                                           **ring._block_kwargs(block, scale))
            ring._merge(out, lse, out_b, lse_b, block.q_rows)
        results.append([out, lse])
    dks = [torch.zeros(local[r][1].shape, device=DEVICE) for r in range(world)]
    dvs = [torch.zeros(local[r][2].shape, device=DEVICE) for r in range(world)]
    for r in range(world):
        q_r, g_r = local[r][0], local[r][3]
        out, lse = results[r]
        dq = torch.zeros(q_r.shape, device=DEVICE)
        for src in range(world):
            block = plans[r][src]
            k_src, v_src = local[src][1], local[src][2]
            dq_b, dk_b, dv_b = attention_block_backward(
                ring._rows(g_r, block.q_rows), ring._rows(q_r, block.q_rows), ring._rows(k_src, block.k_rows),
                ring._rows(v_src, block.k_rows), ring._rows(out, block.q_rows), ring._lse_rows(lse, block.q_rows),
                backend="triton", **ring._block_kwargs(block, scale))
            ring._add_rows(dq, dq_b, block.q_rows)
            ring._add_rows(dks[src], dk_b, block.k_rows)
            ring._add_rows(dvs[src], dv_b, block.k_rows)
        results[r] += [dq]
    return [(shards[r], results[r][0], results[r][2], dks[r], dvs[r]) for r in range(world)]


@pytest.mark.parametrize("causal", [True, False], ids=["zigzag-causal", "bidirectional-with-pads"])
def test_ring_block_plan_on_two_ranks_equals_whole_attention(causal):
    lengths = [13, 1, 6]  # 13 and 1 leave pads at the end of the last chunk
    world = 2
    generator = torch.Generator().manual_seed(5)
    cu = cu_seqlens(lengths)
    q, grad = rand(sum(lengths), 4, 16, generator), rand(sum(lengths), 4, 16, generator)
    k, v = rand(sum(lengths), 2, 16, generator), rand(sum(lengths), 2, 16, generator)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out = attention_reference(*leaves, cu_seqlens=cu.to(DEVICE), max_seqlen=max(lengths), causal=causal)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad)

    covered = 0
    with dispatch.use_backend("triton"):  # also the default for any call that names no backend
        ranks = ring_in_one_process(q, k, v, grad, cu, causal, world)
    for shard, out, dq, dk, dv in ranks:
        real = (shard.index >= 0).to(DEVICE)
        at = shard.index[shard.index >= 0].to(DEVICE)
        covered += int(real.sum())
        assert_close(out[real], ref_out[at], torch.float32, "out")
        for name, got, want in zip("qkv", (dq, dk, dv), ref_grads):
            assert_close(got[real], want[at], torch.float32, f"d{name}")
        if not causal:
            assert (dk[~real] == 0).all() and (dv[~real] == 0).all(), "pad keys are excluded, not attended"
    assert covered == sum(lengths)


# --- the dispatcher -------------------------------------------------------------------------------

def test_dispatcher_serves_triton_and_sdpa_by_name():
    generator = torch.Generator().manual_seed(6)
    q, k, v = (rand(9, 2, 16, generator) for _ in range(3))
    cu = cu_seqlens([4, 5]).to(DEVICE)
    got = attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True, backend="triton")
    assert_close(got, attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True), torch.float32, "out")
    sdpa = attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True, backend="sdpa")
    assert torch.equal(sdpa, attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True, backend="torch"))
    assert dispatch.resolve_backend("auto", "cpu") == "torch"
    assert dispatch.resolve_backend("sdpa", "cuda") == "sdpa"


def test_auto_on_cuda_prefers_flash_attn_then_triton(monkeypatch):
    installed = {"flash_attn": False, "triton": True}
    monkeypatch.setattr(dispatch, "_installed", lambda package: package is None or installed[package])
    assert dispatch.resolve_backend("auto", "cuda") == "triton"
    installed["flash_attn"] = True
    assert dispatch.resolve_backend("auto", "cuda") == "flash_attn"
    installed["flash_attn"] = installed["triton"] = False
    assert dispatch.resolve_backend("auto", "cuda") == "torch"


@pytest.mark.skipif(dispatch._installed("flash_attn"), reason="flash-attn is installed here")
def test_choosing_flash_attn_without_the_package_is_one_line_naming_it():
    q = torch.zeros(4, 2, 16, device=DEVICE)
    cu = cu_seqlens([4]).to(DEVICE)
    with pytest.raises(UnknownBackendError, match="flash_attn.*flash-attn") as plain:
        attention(q, q, q, cu_seqlens=cu, max_seqlen=4, causal=True, backend="flash_attn")
    with pytest.raises(UnknownBackendError, match="flash_attn.*flash-attn") as block:
        attention_block(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="flash_attn")
    assert "\n" not in str(plain.value) and "\n" not in str(block.value)


def test_block_sizes_are_checked():
    q = torch.zeros(4, 2, 16, device=DEVICE)
    kwargs = on_device(block_kwargs([4], [4], causal=False))
    with pytest.raises(ValueError, match="block_m=24 must be a power of two >= 16"):
        block_forward(q, q, q, **kwargs, block_m=24, block_n=16)
    with pytest.raises(ValueError, match="give both block_m and block_n or neither"):
        block_forward(q, q, q, **kwargs, block_m=16)


def test_importing_the_attention_package_does_not_import_triton():
    repo = Path(__file__).resolve().parents[2]
    script = "import sys, engine.kernels.attention; assert 'triton' not in sys.modules, 'triton was imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# --- native GPU runs -------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gpu_autotuned_kernels_match_reference(causal, dtype, head_dim):
    lengths = [1, 300, 77, 1024, 513]
    generator = torch.Generator().manual_seed(head_dim)
    total, cu = sum(lengths), cu_seqlens(lengths).to(DEVICE)
    q, grad = rand(total, 8, head_dim, generator, dtype), rand(total, 8, head_dim, generator, dtype)
    k, v = rand(total, 2, head_dim, generator, dtype), rand(total, 2, head_dim, generator, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention_triton(*leaves, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, leaves, grad)  # autotuned tiles: no block sizes given
    ref_leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_leaves, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal,
                                           return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.float())
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, dtype, f"d{name}")
