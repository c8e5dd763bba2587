"""FlashAttention-2 in Triton: varlen, causal or bidirectional, grouped-query heads, with the LSE.

    out, lse = attention_triton(q, k, v, cu_seqlens=cu, max_seqlen=L, causal=True, return_lse=True)
    out, lse = block_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=False)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=False)

The same three kernels serve plain attention (`attention_triton`, an autograd Function with
reference.py's signature) and ring attention's per-block calls (`block_forward` /
`block_backward`, block.py's contract). Layout is flash-attn's varlen one: q (Tq, Hq, D),
k/v (Tk, Hkv, D) packed streams, sequence i owning rows cu_seqlens[i]:cu_seqlens[i+1]; the
LSE is (Hq, Tq) float32, natural log.

Forward (Dao 2023, Algorithm 1): one program per (query tile, query head, sequence) walks the
key tiles of its sequence with an online softmax in float32 (exp2, scores pre-multiplied by
scale * log2(e)). Key tiles that every row of the query tile may see fully run without masks;
only the tiles at the causal diagonal or the end of the keys pay for them.

Causal is bottom-right aligned, as in flash-attn >= 2.1: query i of a sequence with Lq queries
and Lk keys sees keys j <= i + (Lk - Lq), so the last query sees every key. For Lq == Lk that
is the usual top-left diagonal; for Lq < Lk the queries are the *last* Lq positions of the
keys' sequence (a ring block whose queries come after some of its keys). A query row that sees
no key at all (an empty key segment, or Lq > Lk under causal) gets out = 0 and lse = -inf.

Backward (Algorithm 2 with the dQ loop split out, as Triton's fused-attention tutorial does):
  1. `_delta_kernel`: delta = rowsum(dout * out) - dlse, per (head, row), float32;
  2. `_dkdv_kernel`: one program per (key tile, KV head, sequence) holds its K/V tile and the
     float32 dK/dV accumulators, and walks the query tiles that see it, for every query head of
     its group. Summing the group's heads inside the program is what keeps GQA free of KV copies
     and of atomics: dK/dV are written once, in k's dtype.
  3. `_dq_kernel`: one program per (query tile, query head, sequence) walks the key tiles again.
Why a separate dQ pass rather than FA2's atomic adds into a float32 dQ: atomics are not
deterministic (run-to-run differences in training), need a (Tq, Hq, D) float32 buffer and a
cast, and contend at long sequences; the price is recomputing QK^T and dO V^T in the dQ pass
(7 matrix products instead of 5, ~1.4x the backward FLOPs).

The backward uses the out and lse it is given, never recomputed ones: ring attention passes
the final merged pair, which gives every block its exact share of the gradient. A row whose
lse is -inf gets zero gradient. Through `attention_triton` the LSE output is differentiable as
well (d lse / d S = P, so its gradient folds into delta at no extra cost); block_backward takes
the same term as `grad_lse`.

Interpreter: with TRITON_INTERPRET=1 set before triton is imported, the kernels run on CPU
tensors (slowly: keep shapes tiny, float32/float16 only, the interpreter mishandles bfloat16).
Block sizes default to 16 x 16 there; on a GPU they are autotuned (see the configs below)
unless `block_m`/`block_n` are given.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E), and exp2 is one hardware instruction
_INTERPRETER_BLOCKS = (16, 16)  # tl.dot's smallest tile; bigger only slows the interpreter down
_MAX_GRID_Z = 65535  # CUDA's limit on grid axes 1 and 2 (heads, sequences)


# --- kernels ---------------------------------------------------------------------------------------

@triton.jit
def _load_rows(ptrs, rows_in, d_in, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows past the segment (and head-dim padding) read as 0. The head-dim
    mask only exists when D is not a power of two: a non-constant mask along the contiguous axis
    stops the loads from vectorising."""
    if EVEN_D:  # one return for both branches: compiled Triton wants a single exit from a helper
        tile = tl.load(ptrs, mask=rows_in[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=rows_in[:, None] & d_in[None, :], other=0.0)
    return tile


@triton.jit
def _store_rows(ptrs, value, rows_in, d_in, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, value, mask=rows_in[:, None])
    else:
        tl.store(ptrs, value, mask=rows_in[:, None] & d_in[None, :])


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles of one query tile: [0, full) need no mask, [full, end) do (causal diagonal, key end)."""
    if CAUSAL:
        shift = seqlen_k - seqlen_q  # bottom-right alignment: query i sees keys j <= i + shift
        end = tl.minimum(seqlen_k, start_m + BLOCK_M + shift)
        full = tl.maximum(tl.minimum(seqlen_k, start_m + shift + 1), 0) // BLOCK_N * BLOCK_N
    else:
        end = seqlen_k
        full = seqlen_k // BLOCK_N * BLOCK_N
    return full, end


@triton.jit
def _forward_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, d_in, lo, hi,
                   seqlen_k, shift, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi); m_i in log2 units of the scaled scores."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys_in = offs_n < seqlen_k
        k = _load_rows(k_ptr + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], keys_in, d_in, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            allowed = keys_in[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row that has seen no key yet: measure from 0, so exp2 gives 0 and not NaN
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.exp2(s - m_new_safe[:, None])
        alpha = tl.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptr + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], keys_in, d_in, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(Q, K, V, Out, Lse, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_lh, qk_scale, seqlen_bucket,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (query tile, query head, sequence): out rows in q's dtype, lse rows in float32 (natural log)."""
    start_m = tl.program_id(0) * BLOCK_M
    head, seq = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + seq)
    seqlen_q = tl.load(cu_q + seq + 1) - q_start
    if start_m >= seqlen_q:
        return
    k_start = tl.load(cu_k + seq)
    seqlen_k = tl.load(cu_k + seq + 1) - k_start
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in, d_in = offs_m < seqlen_q, offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_rows(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], rows_in, d_in, EVEN_D)
    kv_head = head // GROUP  # grouped-query heads index their shared KV head: no copies
    k_ptr = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_ptr = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    shift = seqlen_k - seqlen_q
    full, end = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, d_in, 0,
                                   full, seqlen_k, shift, qk_scale, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, d_in, full,
                                   end, seqlen_k, shift, qk_scale, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION)

    seen_nothing = l_i == 0.0  # no key reachable: out 0, lse -inf (block.py's contract)
    l_safe = tl.where(seen_nothing, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(seen_nothing, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    _store_rows(Out + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                out.to(Out.dtype.element_ty), rows_in, d_in, EVEN_D)
    tl.store(Lse + head * stride_lh + q_rows, lse, mask=rows_in)


@triton.jit
def _delta_kernel(Out, DOut, DLse, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                  HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dout * out) - dlse for BLOCK_M rows of one head: the softmax term shared by dQ and dK."""
    head = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in, d_in = rows < total_q, offs_d < HEAD_DIM
    mask = rows_in[:, None] & d_in[None, :]
    out = tl.load(Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    dout = tl.load(DOut + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    if HAS_DLSE:  # d lse / d S = P: the lse gradient enters dS = P * (dP - delta) as -dlse
        delta -= tl.load(DLse + head * stride_lh + rows, mask=rows_in, other=0.0)
    tl.store(Delta + head * stride_lh + rows, delta, mask=rows_in)


@triton.jit
def _load_row_stats(Lse, Delta, head, stride_lh, rows, rows_in):
    """lse (log2 units) and delta of some query rows. lse -inf (the row saw no key anywhere) turns
    into +inf, as do rows past the segment, so P = exp2(S - lse) is 0 there and not NaN."""
    lse = tl.load(Lse + head * stride_lh + rows, mask=rows_in, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + head * stride_lh + rows, mask=rows_in, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DOut, Lse, Delta, q_start, head, stride_qt, stride_qh, stride_dot, stride_doh,
                stride_lh, offs_n, offs_d, d_in, lo, hi, seqlen_q, shift, qk_scale, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Add to one key tile's dK/dV (unscaled) the share of query tiles [lo, hi) of one query head.

    Works on transposed scores (BLOCK_N, BLOCK_M) so that dV = P^T dO and dK = dS^T Q need no
    transpose of an accumulator. Query rows past the segment read q = dout = 0 and lse = +inf:
    they add exactly 0, so only the causal diagonal needs a mask."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_in = offs_m < seqlen_q
        rows = q_start + offs_m.to(tl.int64)
        q = _load_rows(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], rows_in, d_in, EVEN_D)
        dout = _load_rows(DOut + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], rows_in, d_in,
                          EVEN_D)
        lse, delta = _load_row_stats(Lse, Delta, head, stride_lh, rows, rows_in)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, p_t, 0.0)
        dv = tl.dot(p_t.to(dout.dtype), dout, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(dout), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                 stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                 qk_scale, sm_scale, seqlen_bucket, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """One (key tile, KV head, sequence): dK, dV summed over the GROUP query heads sharing the KV head."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_head, seq = tl.program_id(1), tl.program_id(2)
    k_start = tl.load(cu_k + seq)
    seqlen_k = tl.load(cu_k + seq + 1) - k_start
    if start_n >= seqlen_k:
        return
    q_start = tl.load(cu_q + seq)
    seqlen_q = tl.load(cu_q + seq + 1) - q_start
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keys_in, d_in = offs_n < seqlen_k, offs_d < HEAD_DIM
    k_rows = (k_start + offs_n).to(tl.int64)
    k = _load_rows(K + k_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], keys_in, d_in, EVEN_D)
    v = _load_rows(V + k_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], keys_in, d_in, EVEN_D)

    # Query tiles that see this key tile: [lo, full) straddle the causal diagonal (masked),
    # [full, seqlen_q) see all of it. Bidirectional: every tile, none masked.
    shift = seqlen_k - seqlen_q
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), seqlen_q)
        full = tl.maximum(tl.cdiv(full, BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full = 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DOut, Lse, Delta, q_start, head, stride_qt, stride_qh, stride_dot,
                             stride_doh, stride_lh, offs_n, offs_d, d_in, lo, full, seqlen_q, shift, qk_scale,
                             BLOCK_M, True, EVEN_D, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DOut, Lse, Delta, q_start, head, stride_qt, stride_qh, stride_dot,
                             stride_doh, stride_lh, offs_n, offs_d, d_in, full, seqlen_q, seqlen_q, shift, qk_scale,
                             BLOCK_M, False, EVEN_D, PRECISION)
    # Every key row is written, zeros included (no query sees it): callers may allocate with empty.
    _store_rows(DK + k_rows[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                (dk * sm_scale).to(DK.dtype.element_ty), keys_in, d_in, EVEN_D)
    _store_rows(DV + k_rows[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                dv.to(DV.dtype.element_ty), keys_in, d_in, EVEN_D)


@triton.jit
def _dq_tiles(dq, q, dout, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, d_in, lo, hi, seqlen_k,
              shift, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Add to one query tile's dQ (unscaled) the share of key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys_in = offs_n < seqlen_k
        k = _load_rows(k_ptr + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], keys_in, d_in, EVEN_D)
        v = _load_rows(v_ptr + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], keys_in, d_in, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            allowed = keys_in[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(dout, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
               stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale,
               seqlen_bucket, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (query tile, query head, sequence): dQ over the same key tiles the forward visited."""
    start_m = tl.program_id(0) * BLOCK_M
    head, seq = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + seq)
    seqlen_q = tl.load(cu_q + seq + 1) - q_start
    if start_m >= seqlen_q:
        return
    k_start = tl.load(cu_k + seq)
    seqlen_k = tl.load(cu_k + seq + 1) - k_start
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in, d_in = offs_m < seqlen_q, offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = _load_rows(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], rows_in, d_in, EVEN_D)
    dout = _load_rows(DOut + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], rows_in, d_in, EVEN_D)
    lse, delta = _load_row_stats(Lse, Delta, head, stride_lh, rows, rows_in)
    kv_head = head // GROUP
    k_ptr = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_ptr = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = seqlen_k - seqlen_q
    full, end = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, dout, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, d_in, 0, full,
                   seqlen_k, shift, qk_scale, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION)
    dq = _dq_tiles(dq, q, dout, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, d_in, full, end,
                   seqlen_k, shift, qk_scale, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION)
    _store_rows(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                (dq * sm_scale).to(DQ.dtype.element_ty), rows_in, d_in, EVEN_D)


# --- autotuning (GPU only) --------------------------------------------------------------------------
#
# Chosen for Hopper (H100 SXM: 132 SMs, 227 KiB of shared memory per block, 64K 32-bit registers
# per SM) with Triton's FA2-style code generation (no TMA/warp specialisation, which is FA3's
# territory). The reasoning, per head dim D (2-byte inputs):
# - Forward: a (BLOCK_M, D) Q tile and the float32 accumulator stay in registers; K and V tiles
#   stream through shared memory, num_stages deep. Shared memory ~ 2 * (BLOCK_M * D + stages *
#   2 * BLOCK_N * D) bytes. BLOCK_M = 128 with 8 warps (two warpgroups, 64 rows each, the wgmma
#   M) for D <= 128; D = 128, BLOCK_N = 128, 3 stages would need 224 KiB, at the limit, hence
#   BLOCK_N = 64 with 3 stages (128 KiB) or 128 with 2 (160 KiB). D = 256 doubles every tile: BLOCK_M
#   64-128 with BLOCK_N 32-64 and 2 stages keeps the accumulator (BLOCK_M x 256 fp32 = 128 KiB at
#   BLOCK_M 128, 128 registers per thread over 8 warps) from spilling.
# - dK/dV: the program holds K, V and two float32 accumulators of (BLOCK_N, D): 4 * BLOCK_N * D
#   values, so BLOCK_N * D <= 16K keeps them within ~255 registers per thread at 8 warps
#   (BLOCK_N 128 for D = 64, 64 for D = 128, 32 for D = 256); the streamed Q and dO tiles are
#   small (BLOCK_M 32-64) so that more of them pipeline.
# - dQ: the mirror image: Q, dO and the dQ accumulator resident, K/V tiles (BLOCK_N 32-64) stream.
# Candidates that cannot fit shared memory are pruned before compiling. Not yet measured on an
# H100 (the development machine has no GPU): this is the space the autotuner chooses from, and
# bench/kernel_bench.py --what attention is where to check what it picks. The key adds the
# power-of-two bucket of the longest sequence, so short packed rows and 32K-token sequences tune
# separately without retuning at every new max_seqlen.

_SHARED_MEMORY_BYTES = 227 * 1024


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_FORWARD_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                             (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)])
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2),
                          (64, 32, 4, 2)])
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)])


def _forward_fits(configs, named_args, **kwargs):
    return _fitting(configs, named_args, streamed=lambda c: 2 * c.kwargs["BLOCK_N"],
                    resident=lambda c: c.kwargs["BLOCK_M"], register_rows=lambda c: c.kwargs["BLOCK_M"])


def _dkdv_fits(configs, named_args, **kwargs):
    return _fitting(configs, named_args, streamed=lambda c: 2 * c.kwargs["BLOCK_M"],
                    resident=lambda c: 2 * c.kwargs["BLOCK_N"], register_rows=lambda c: 2 * c.kwargs["BLOCK_N"])


def _dq_fits(configs, named_args, **kwargs):
    return _fitting(configs, named_args, streamed=lambda c: 2 * c.kwargs["BLOCK_N"],
                    resident=lambda c: 2 * c.kwargs["BLOCK_M"], register_rows=lambda c: c.kwargs["BLOCK_M"])


def _fitting(configs, named_args, streamed, resident, register_rows):
    """Configs whose shared memory (streamed tiles x stages + resident tiles) fits, and whose float32
    accumulators stay under ~128 registers per thread; never an empty list."""
    head_dim = named_args["Q"].shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    element = named_args["Q"].element_size()
    kept = []
    for c in configs:
        shared = element * block_d * (c.num_stages * streamed(c) + resident(c))
        registers_per_thread = register_rows(c) * block_d / (32 * c.num_warps)
        if shared <= _SHARED_MEMORY_BYTES and registers_per_thread <= 128:
            kept.append(c)
    return kept or [min(configs, key=lambda c: streamed(c) + resident(c))]


_KEY = ["HEAD_DIM", "GROUP", "CAUSAL", "seqlen_bucket"]
_forward_tuned = triton.autotune(_FORWARD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _forward_fits})(
    _forward_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _dkdv_fits})(
    _dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _dq_fits})(_dq_kernel)


# --- launchers ---------------------------------------------------------------------------------------

def block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None, causal: bool, scale: float | None = None, block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """-> out (Tq, Hq, D) in q's dtype, lse (Hq, Tq) float32; block.py's contract, causal bottom-right."""
    q, k, v = _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    cu_q, cu_k = _cu(cu_seqlens_q, q), _cu(cu_seqlens_k, q)
    max_seqlen_q = _max_seqlen(cu_q, max_seqlen_q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out, lse
    args = (q, k, v, out, lse, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), out.stride(0), out.stride(1), lse.stride(0), scale * LOG2E, _bucket(max_seqlen_q))
    _launch(_forward_kernel, _forward_tuned, args, _meta(q, k, causal), block_m, block_n,
            grid=lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), q.shape[1], cu_q.numel() - 1))
    return out, lse


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool,
    scale: float | None = None, grad_lse: Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients given the final out (Tq, Hq, D) and lse (Hq, Tq) of the query rows (block.py's contract).

    grad_lse (Hq, Tq), optional: an upstream gradient of the lse itself.
    -> dq (Tq, Hq, D), dk (Tk, Hkv, D), dv (Tk, Hkv, D) in the dtypes of q, k, v."""
    q, k, v = _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    cu_q, cu_k = _cu(cu_seqlens_q, q), _cu(cu_seqlens_k, q)
    max_seqlen_q, max_seqlen_k = _max_seqlen(cu_q, max_seqlen_q), _max_seqlen(cu_k, max_seqlen_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # tl.dot wants both operands in one dtype: dO meets P (cast to dO's dtype) and V, so it takes q's.
    dout = _last_dim_contiguous(dout.to(q.dtype))
    lse = lse.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if k.shape[0] == 0 or max_seqlen_k == 0:  # no keys: nothing was attended, every gradient is 0
        return dq.zero_(), dk, dv
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = _delta(out, dout, grad_lse, lse)
    common = (lse.stride(0), scale * LOG2E, scale, _bucket(max(max_seqlen_q, max_seqlen_k)))
    meta = _meta(q, k, causal)
    _launch(_dkdv_kernel, _dkdv_tuned,
            (q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
             v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
             dv.stride(1), *common), meta, block_m, block_n,
            grid=lambda m: (triton.cdiv(max_seqlen_k, m["BLOCK_N"]), k.shape[1], cu_k.numel() - 1))
    _launch(_dq_kernel, _dq_tuned,
            (q, k, v, dout, lse, delta, dq, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
             v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), *common),
            meta, block_m, block_n,
            grid=lambda m: (triton.cdiv(max_seqlen_q, m["BLOCK_M"]), q.shape[1], cu_q.numel() - 1))
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    """forward: varlen FlashAttention-2 kernel -> out [, lse] | backward: dQ, dK, dV kernels
    (the lse's gradient, when it has one, folds into delta)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse, block_m, block_n):
        out, lse = block_forward(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                 max_seqlen_k=max_seqlen, causal=causal, scale=scale, block_m=block_m, block_n=block_n)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.blocks = max_seqlen, causal, scale, (block_m, block_n)
        if not return_lse:
            ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an unused lse gets None, not an (Hq, T) tensor of zeros
        return out, lse

    @staticmethod
    def backward(ctx, dout, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = block_backward(
            dout, q, k, v, out, lse, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=ctx.max_seqlen,
            max_seqlen_k=ctx.max_seqlen, causal=ctx.causal, scale=ctx.scale, grad_lse=grad_lse,
            block_m=ctx.blocks[0], block_n=ctx.blocks[1])
        return dq, dk, dv, None, None, None, None, None, None, None


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int | None, causal: bool,
    scale: float | None = None, return_lse: bool = False, block_m: int | None = None, block_n: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """reference.attention_reference's signature and results, computed by the Triton kernels.

    Differentiable in q, k, v, and through the lse when return_lse=True."""
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: k has {k.shape[0]} rows but q has {q.shape[0]}; one packed stream is one "
                         f"cu_seqlens (use block_forward for separate query and key streams)")
    out, lse = TritonAttention.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse, block_m, block_n)
    return (out, lse) if return_lse else out


# --- helpers -----------------------------------------------------------------------------------------

def _launch(kernel, tuned, args, meta: dict, block_m: int | None, block_n: int | None, grid) -> None:
    """Explicit block sizes (tests, the interpreter) run the plain kernel; otherwise the autotuned one."""
    if block_m is None and block_n is None and triton.knobs.runtime.interpret:
        block_m, block_n = _INTERPRETER_BLOCKS
    if block_m is None and block_n is None:
        tuned[grid](*args, **meta)
        return
    if block_m is None or block_n is None:
        raise ValueError(f"attention (triton): give both block_m and block_n or neither; got {block_m}, {block_n}")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"attention (triton): {name}={size} must be a power of two >= 16 (tl.dot's smallest tile)")
    kernel[grid(dict(BLOCK_M=block_m, BLOCK_N=block_n))](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)


def _meta(q: Tensor, k: Tensor, causal: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=head_dim, CAUSAL=bool(causal),
                # float32 inputs get float32 products: TF32 would keep ~3 digits, far from the reference
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


def _delta(out: Tensor, dout: Tensor, grad_lse: Tensor | None, lse: Tensor) -> Tensor:
    """(Hq, Tq) float32: rowsum(dout * out) - grad_lse."""
    out = _last_dim_contiguous(out)
    total, heads, head_dim = out.shape
    delta = torch.empty((heads, total), dtype=torch.float32, device=out.device)
    has_dlse = grad_lse is not None
    dlse = grad_lse.float().contiguous() if has_dlse else lse  # a placeholder pointer when absent
    block_m = 16 if triton.knobs.runtime.interpret else 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    _delta_kernel[(triton.cdiv(total, block_m), heads)](
        out, dout, dlse, delta, total, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HAS_DLSE=has_dlse, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=block_d)
    return delta


def _check(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention (triton): q must be (Tq, Hq, D) and k, v (Tk, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention (triton): {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention (triton): q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"attention (triton): head dim {q.shape[-1]} is above 256")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attention (triton): {cu_q.numel() - 1} query sequences but {cu_k.numel() - 1} key sequences")
    if cu_q.numel() - 1 > _MAX_GRID_Z:
        raise ValueError(f"attention (triton): {cu_q.numel() - 1} sequences in one call; at most {_MAX_GRID_Z}")
    if q.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise ValueError("attention (triton): CPU tensors need TRITON_INTERPRET=1 set before triton is imported; "
                         "use the 'torch' backend on CPU")
    return _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    """Rows and heads may be strided (e.g. views into a fused QKV projection); the head dim may not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _cu(cu_seqlens: Tensor, like: Tensor) -> Tensor:
    return cu_seqlens.to(device=like.device, dtype=torch.int32)


def _max_seqlen(cu: Tensor, given: int | None) -> int:
    """The caller's bound (trusted: checking it would cost a device sync), else measured."""
    if given is not None:
        return int(given)
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _bucket(length: int) -> int:
    return triton.next_power_of_2(max(int(length), 1))


__all__ = ["attention_triton", "block_backward", "block_forward", "TritonAttention"]
