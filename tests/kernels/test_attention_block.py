"""Per-block attention with LSE (engine/kernels/attention/block.py): the unit ring attention is built from.

The stories, each against an independent reference:
- one block holding whole sequences is plain varlen attention (`attention(..., return_lse=True)`);
- blocks with different query and key lengths, empty ones included, match a float64 textbook
  formula per sequence;
- key blocks merged through their LSE give whole attention, and each block's backward, given
  the merged out and lse, gives its exact share of the gradient (the ring attention identity);
- the CPU flash path equals the math spec, even for an out and lse it did not compute itself;
- the CPU path never builds an (Lq, Lk) score matrix (peak memory in a subprocess).

Tolerances: float32 attention over <= 40 keys with order-one values keeps ~1e-6 error;
1e-5 (absolute and relative) leaves a margin and still catches any masking, pairing or
head-grouping mistake, which are order-one errors. bfloat16 keeps ~3 significant digits,
hence 3e-2 against the fp32 spec on the same rounded inputs.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.kernels.attention import UnknownBackendError, attention, attention_block, attention_block_backward
from engine.kernels.attention import dispatch
from engine.kernels.attention.block import block_backward, block_forward, math_block_backward, math_block_forward

TOL = dict(rtol=1e-5, atol=1e-5)
PATHS = {"cpu_flash": (block_forward, block_backward), "math": (math_block_forward, math_block_backward)}
HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads, KV heads): GQA ratios 1, 2, 4
DIM = 8


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def randn(rows: int, heads: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, heads, DIM, generator=generator).to(dtype)


def block_kwargs(q_lengths: list[int], k_lengths: list[int], causal: bool) -> dict:
    return dict(cu_seqlens_q=cu_seqlens(q_lengths), cu_seqlens_k=cu_seqlens(k_lengths),
                max_seqlen_q=max(q_lengths), max_seqlen_k=max(k_lengths), causal=causal)


def merge(out_a, lse_a, out_b, lse_b):
    """Two partial results of the same query rows -> one, through their LSE in fp32."""
    lse = torch.logaddexp(lse_a, lse_b)  # (H, T)
    weight_a = torch.exp(lse_a - lse).nan_to_num().T[..., None]  # (T, H, 1); -inf - -inf: a row with no keys
    weight_b = torch.exp(lse_b - lse).nan_to_num().T[..., None]
    return out_a.float() * weight_a + out_b.float() * weight_b, lse


# --- a block of whole sequences is varlen attention ------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("q_heads, kv_heads", HEADS)
def test_whole_sequence_block_equals_varlen_attention(causal, q_heads, kv_heads):
    lengths = [7, 1, 13, 5, 1, 7, 7]  # unequal, length-1, and equal lengths batched into one call
    generator = torch.Generator().manual_seed(q_heads * 10 + kv_heads)
    q, grad = randn(sum(lengths), q_heads, generator), randn(sum(lengths), q_heads, generator)
    k, v = randn(sum(lengths), kv_heads, generator), randn(sum(lengths), kv_heads, generator)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention(*leaves, cu_seqlens=cu_seqlens(lengths), max_seqlen=max(lengths), causal=causal,
                                 backend="torch", return_lse=True)
    (ref_out * grad).sum().backward()

    kwargs = block_kwargs(lengths, lengths, causal)
    for path, (forward, backward) in PATHS.items():
        out, lse = forward(q, k, v, **kwargs)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (q_heads, sum(lengths))
        torch.testing.assert_close(out, ref_out.detach(), **TOL, msg=lambda m: f"{path} out: {m}")
        torch.testing.assert_close(lse, ref_lse.detach(), **TOL, msg=lambda m: f"{path} lse: {m}")
        for name, got, leaf in zip("qkv", backward(grad, q, k, v, out, lse, **kwargs), leaves):
            torch.testing.assert_close(got, leaf.grad, **TOL, msg=lambda m: f"{path} d{name}: {m}")


# --- blocks of different query and key lengths, empty ones included ------------------------------

def textbook_block(q, k, v, q_lengths, k_lengths, scale):
    """Float64 softmax(q k^T) v per sequence of non-causal blocks; rows without keys: out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    q_bounds, k_bounds = cu_seqlens(q_lengths).tolist(), cu_seqlens(k_lengths).tolist()
    for i in range(len(q_lengths)):
        qi = q[q_bounds[i]:q_bounds[i + 1]].double()
        ki = k[k_bounds[i]:k_bounds[i + 1]].double().repeat_interleave(group, dim=1)
        vi = v[k_bounds[i]:k_bounds[i + 1]].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        lse = torch.logsumexp(scores, dim=-1) if ki.shape[0] else scores.new_full(scores.shape[:2], -math.inf)
        probs = torch.exp(scores - lse[..., None])
        outs.append(torch.einsum("hqk,khd->qhd", probs, vi))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("path", PATHS)
def test_blocks_with_different_query_and_key_lengths(path):
    forward, backward = PATHS[path]
    q_lengths = [3, 0, 5, 2, 4, 1, 4]  # an empty query part; 4 x 9 twice (one batched call)
    k_lengths = [6, 4, 0, 2, 9, 1, 9]  # an empty key part: its queries see nothing
    scale = 0.3
    generator = torch.Generator().manual_seed(1)
    q, grad = randn(sum(q_lengths), 4, generator), randn(sum(q_lengths), 4, generator)
    k, v = randn(sum(k_lengths), 2, generator), randn(sum(k_lengths), 2, generator)

    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = textbook_block(*leaves, q_lengths, k_lengths, scale)
    (ref_out * grad.double()).sum().backward()

    kwargs = dict(block_kwargs(q_lengths, k_lengths, causal=False), scale=scale)
    out, lse = forward(q, k, v, **kwargs)
    no_keys = slice(3, 8)  # the queries of sequence 2, whose key part is empty
    assert (out[no_keys] == 0).all() and (lse[:, no_keys] == -math.inf).all()
    torch.testing.assert_close(out, ref_out.float().detach(), **TOL)
    torch.testing.assert_close(lse, ref_lse.float().detach(), **TOL)
    grads = backward(grad, q, k, v, out, lse, **kwargs)
    assert (grads[0][no_keys] == 0).all(), "rows without keys (lse -inf) get zero gradient, not NaN"
    for name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad.float(), **TOL, msg=lambda m: f"d{name}: {m}")


def test_block_contract_errors_are_one_line():
    q = torch.zeros(5, 2, DIM)
    with pytest.raises(ValueError, match="causal needs equal query and key lengths, sequence 0 has 5 and 3"):
        block_forward(q, q[:3], q[:3], **block_kwargs([5], [3], causal=True))
    with pytest.raises(ValueError, match="1 query sequences but 2 key sequences"):
        block_forward(q, q, q, **block_kwargs([5], [2, 3], causal=False))
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 KV heads"):
        block_forward(torch.zeros(5, 3, DIM), q, q, **block_kwargs([5], [5], causal=False))


# --- merging key blocks through the LSE: the ring attention identity ----------------------------

def halves(lengths: list[int]) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """Each sequence cut into a first and a second half -> lengths of each half and their stream rows."""
    first = [n // 2 for n in lengths]
    second = [n - h for n, h in zip(lengths, first)]
    starts = cu_seqlens(lengths)[:-1].tolist()
    rows_first = [s + i for s, h in zip(starts, first) for i in range(h)]
    rows_second = [s + h + i for s, h, r in zip(starts, first, second) for i in range(r)]
    return first, second, torch.tensor(rows_first), torch.tensor(rows_second)


@pytest.mark.parametrize("path", PATHS)
def test_bidirectional_key_blocks_merge_into_whole_attention(path):
    forward, backward = PATHS[path]
    lengths = [7, 1, 12, 5, 6]  # the 1-token sequence has an empty first key block
    first, second, rows_a, rows_b = halves(lengths)
    generator = torch.Generator().manual_seed(2)
    q, grad = randn(sum(lengths), 4, generator), randn(sum(lengths), 4, generator)
    k, v = randn(sum(lengths), 2, generator), randn(sum(lengths), 2, generator)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention(*leaves, cu_seqlens=cu_seqlens(lengths), max_seqlen=max(lengths), causal=False,
                                 backend="torch", return_lse=True)
    (ref_out * grad).sum().backward()

    block_a = block_kwargs(lengths, first, causal=False)
    block_b = block_kwargs(lengths, second, causal=False)
    out, lse = merge(*forward(q, k[rows_a], v[rows_a], **block_a), *forward(q, k[rows_b], v[rows_b], **block_b))
    torch.testing.assert_close(out, ref_out.detach(), **TOL)
    torch.testing.assert_close(lse, ref_lse.detach(), **TOL)

    # Each block's backward sees the merged out and lse; key gradients go back to their rows.
    dq_a, dk_a, dv_a = backward(grad, q, k[rows_a], v[rows_a], out, lse, **block_a)
    dq_b, dk_b, dv_b = backward(grad, q, k[rows_b], v[rows_b], out, lse, **block_b)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk[rows_a], dk[rows_b], dv[rows_a], dv[rows_b] = dk_a, dk_b, dv_a, dv_b
    for name, got, leaf in zip("qkv", (dq_a + dq_b, dk, dv), leaves):
        torch.testing.assert_close(got, leaf.grad, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_causal_blocks_merge_into_whole_attention(path):
    """Ring attention's causal pattern on two halves A, B: A attends A (diagonal block), B attends A
    (whole block) and B (diagonal block)."""
    forward, backward = PATHS[path]
    lengths = [7, 1, 12, 5, 6]
    first, second, rows_a, rows_b = halves(lengths)
    generator = torch.Generator().manual_seed(3)
    q, grad = randn(sum(lengths), 4, generator), randn(sum(lengths), 4, generator)
    k, v = randn(sum(lengths), 2, generator), randn(sum(lengths), 2, generator)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention(*leaves, cu_seqlens=cu_seqlens(lengths), max_seqlen=max(lengths), causal=True,
                                 backend="torch", return_lse=True)
    (ref_out * grad).sum().backward()

    qa, ka, va, ga = q[rows_a], k[rows_a], v[rows_a], grad[rows_a]
    qb, kb, vb, gb = q[rows_b], k[rows_b], v[rows_b], grad[rows_b]
    aa = block_kwargs(first, first, causal=True)
    ba = block_kwargs(second, first, causal=False)
    bb = block_kwargs(second, second, causal=True)
    out_a, lse_a = forward(qa, ka, va, **aa)
    out_b, lse_b = merge(*forward(qb, ka, va, **ba), *forward(qb, kb, vb, **bb))
    torch.testing.assert_close(out_a, ref_out.detach()[rows_a], **TOL)
    torch.testing.assert_close(out_b, ref_out.detach()[rows_b], **TOL)
    torch.testing.assert_close(lse_b, ref_lse.detach()[:, rows_b], **TOL)

    dq_aa, dk_aa, dv_aa = backward(ga, qa, ka, va, out_a, lse_a, **aa)
    dq_ba, dk_ba, dv_ba = backward(gb, qb, ka, va, out_b, lse_b, **ba)
    dq_bb, dk_bb, dv_bb = backward(gb, qb, kb, vb, out_b, lse_b, **bb)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq[rows_a], dq[rows_b] = dq_aa, dq_ba + dq_bb
    dk[rows_a], dk[rows_b] = dk_aa + dk_ba, dk_bb
    dv[rows_a], dv[rows_b] = dv_aa + dv_ba, dv_bb
    for name, got, leaf in zip("qkv", (dq, dk, dv), leaves):
        torch.testing.assert_close(got, leaf.grad, **TOL, msg=lambda m: f"d{name}: {m}")


# --- the CPU flash path against the math spec ------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("q_heads, kv_heads", HEADS)
def test_cpu_flash_path_equals_math_path_for_any_out_and_lse(causal, q_heads, kv_heads):
    """The backward must use the out and lse it is given (ring attention passes merged ones), so it is
    fed a random out and an lse above the block's own; one row has lse -inf and must get zeros."""
    q_lengths = [9, 3, 9, 1, 40]
    k_lengths = q_lengths if causal else [5, 3, 5, 8, 33]
    generator = torch.Generator().manual_seed(4)
    q, grad, final_out = (randn(sum(q_lengths), q_heads, generator) for _ in range(3))
    k, v = randn(sum(k_lengths), kv_heads, generator), randn(sum(k_lengths), kv_heads, generator)
    kwargs = block_kwargs(q_lengths, k_lengths, causal)

    out, lse = block_forward(q, k, v, **kwargs)
    spec_out, spec_lse = math_block_forward(q, k, v, **kwargs)
    torch.testing.assert_close(out, spec_out, **TOL)
    torch.testing.assert_close(lse, spec_lse, **TOL)

    final_lse = lse + torch.rand(lse.shape, generator=generator)  # other blocks added probability mass
    final_lse[1, 12] = -math.inf
    grads = block_backward(grad, q, k, v, final_out, final_lse, **kwargs)
    spec_grads = math_block_backward(grad, q, k, v, final_out, final_lse, **kwargs)
    assert (grads[0][12, 1] == 0).all(), "a row with lse -inf gets zero gradient"
    for name, got, spec in zip("qkv", grads, spec_grads):
        assert torch.isfinite(got).all(), f"d{name} has NaN or inf"
        torch.testing.assert_close(got, spec, **TOL, msg=lambda m: f"d{name}: {m}")


def test_cpu_flash_path_bfloat16_smoke():
    q_lengths, k_lengths = [6, 17, 6], [6, 11, 6]
    generator = torch.Generator().manual_seed(5)
    q, grad = (randn(sum(q_lengths), 4, generator, torch.bfloat16) for _ in range(2))
    k, v = (randn(sum(k_lengths), 2, generator, torch.bfloat16) for _ in range(2))
    kwargs = block_kwargs(q_lengths, k_lengths, causal=False)

    out, lse = block_forward(q, k, v, **kwargs)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    spec_out, spec_lse = math_block_forward(q.float(), k.float(), v.float(), **kwargs)
    torch.testing.assert_close(out.float(), spec_out, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse, spec_lse, rtol=3e-2, atol=3e-2)
    grads = block_backward(grad, q, k, v, out, lse, **kwargs)
    spec_grads = math_block_backward(grad.float(), q.float(), k.float(), v.float(), out.float(), lse, **kwargs)
    for name, got, spec in zip("qkv", grads, spec_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), spec, rtol=3e-2, atol=3e-2, msg=lambda m: f"d{name}: {m}")


# --- the dispatcher ------------------------------------------------------------------------------

def test_dispatcher_serves_the_torch_block_backend_and_names_what_is_missing(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    q, k, v, grad = (randn(9, 2, generator) for _ in range(4))
    kwargs = block_kwargs([4, 5], [4, 5], causal=True)
    out, lse = attention_block(q, k, v, backend="torch", **kwargs)
    expected = block_forward(q, k, v, **kwargs)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    for got, want in zip(attention_block_backward(grad, q, k, v, out, lse, backend="torch", **kwargs),
                         block_backward(grad, q, k, v, out, lse, **kwargs)):
        assert torch.equal(got, want)

    with pytest.raises(UnknownBackendError, match="unknown attention backend 'nonesuch'") as unknown:
        attention_block(q, k, v, backend="nonesuch", **kwargs)
    monkeypatch.setitem(dispatch._REGISTRY, "blockless", "engine.kernels.attention.reference:attention_reference")
    with pytest.raises(UnknownBackendError, match="'blockless' has no per-block functions") as blockless:
        attention_block_backward(grad, q, k, v, out, lse, backend="blockless", **kwargs)
    assert "\n" not in str(unknown.value) and "\n" not in str(blockless.value)


# --- memory: no (Lq, Lk) score matrix on the CPU path ------------------------------------------------

PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from engine.kernels.attention.block import block_backward, block_forward
    torch.set_num_threads(2)  # the kernel's scratch is per thread: fix it so the bound holds on any machine
    length, heads, dim = 4096, 2, 16
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(length, heads, dim, generator=generator) for _ in range(4))

    def step(n):
        cu = torch.tensor([0, n], dtype=torch.int32)
        kwargs = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=False)
        out, lse = block_forward(q[:n], k[:n], v[:n], **kwargs)
        block_backward(grad[:n], q[:n], k[:n], v[:n], out, lse, **kwargs)

    step(64)  # load the kernels and the thread pool before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step(length)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_cpu_path_memory_does_not_grow_with_the_score_matrix():
    # The math path allocates (H, L, L) fp32 scores several times over: 128 MiB each at
    # L = 4096, H = 2 (measured peak growth ~500 MiB). The flash path needs O(L * H * D): ~9 MiB.
    score_matrix_bytes = 4096 * 4096 * 2 * 4
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT], cwd=repo, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    peak_growth = int(result.stdout.strip())
    assert peak_growth < score_matrix_bytes / 4, f"peak RSS grew {peak_growth / 2**20:.0f} MiB"
