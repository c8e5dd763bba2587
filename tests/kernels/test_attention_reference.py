"""The PyTorch attention backend against the textbook formula, and the backend dispatcher.

The reference is softmax(q k^T / sqrt(D)) v written out per sequence with explicit
repeat_interleave for grouped-query heads, computed in float64 so that its own rounding
does not count. Tolerances: float32 attention over <= 70 keys keeps ~1e-6 relative error;
5e-5 absolute on values and gradients of order one leaves a wide margin and still catches
any masking or head-grouping mistake (those are order-one errors).
"""
from __future__ import annotations

import math

import itertools

import pytest
import torch

from engine.kernels.attention import (
    UnknownBackendError,
    attention,
    available_backends,
    get_default_backend,
    register_backend,
    resolve_backend,
    set_default_backend,
    use_backend,
)
from engine.kernels.attention.reference import attention_reference, plan_buckets

ATOL = 5e-5


def naive_sequence_attention(q, k, v, causal, scale):
    """q (L, Hq, D), k/v (L, Hkv, D) -> out (L, Hq, D), lse (Hq, L); float64, no shortcuts."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale  # (Hq, L, L)
    if causal:
        length = q.shape[0]
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)
    return out, lse


def naive_varlen(q, k, v, cu_seqlens, causal, scale):
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, lse = naive_sequence_attention(q[start:end], k[start:end], v[start:end], causal, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def make_inputs(lengths, q_heads, kv_heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, q_heads, head_dim, generator=gen)
    k = torch.randn(total, kv_heads, head_dim, generator=gen)
    v = torch.randn(total, kv_heads, head_dim, generator=gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return q, k, v, cu


CASES = [
    # (lengths, q heads, kv heads, head_dim): odd lengths, a length-1 sequence, mixed lengths
    # that split into several buckets, equal lengths (one unpadded bucket), GQA and MHA.
    ([7, 1, 13, 5], 4, 2, 16),
    ([33], 6, 3, 8),
    ([70, 3, 3, 41, 9], 8, 2, 12),
    ([16, 16, 16], 4, 4, 32),
    # Longest first (a sorted encode batch): the buckets hold the stream in order, no scatter back.
    ([70, 41, 9, 3, 3], 8, 2, 12),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("lengths, q_heads, kv_heads, head_dim", CASES)
@pytest.mark.parametrize("return_lse", [False, True], ids=["sdpa", "math+lse"])
def test_forward_and_backward_match_the_naive_formula(lengths, q_heads, kv_heads, head_dim, causal, return_lse):
    q, k, v, cu = make_inputs(lengths, q_heads, kv_heads, head_dim)
    scale = 0.7 / math.sqrt(head_dim)  # a non-default scale must be honoured
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grad_lse = torch.randn(q_heads, q.shape[0], generator=torch.Generator().manual_seed(2))

    ours = [t.clone().requires_grad_(True) for t in (q, k, v)]
    result = attention_reference(*ours, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal,
                                 scale=scale, return_lse=return_lse)
    out = result[0] if return_lse else result
    loss = (out * grad_out).sum() + ((result[1] * grad_lse).sum() if return_lse else 0)
    loss.backward()

    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = naive_varlen(*ref, cu, causal, scale)
    ref_loss = (ref_out * grad_out.double()).sum() + ((ref_lse * grad_lse.double()).sum() if return_lse else 0)
    ref_loss.backward()

    torch.testing.assert_close(out.double(), ref_out.detach(), atol=ATOL, rtol=0)
    if return_lse:
        assert result[1].dtype == torch.float32 and result[1].shape == (q_heads, q.shape[0])
        torch.testing.assert_close(result[1].double(), ref_lse.detach(), atol=ATOL, rtol=0)
    for name, mine, theirs in zip("qkv", ours, ref):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=ATOL, rtol=0, msg=f"grad of {name}")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, cu = make_inputs([9, 4], 4, 2, 16)
    out = attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=9, causal=True)
    ref, _ = naive_varlen(q.double(), k.double(), v.double(), cu, True, 16**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, cu = make_inputs([11, 6], 4, 2, 16)
    out = attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_seqlens=cu, max_seqlen=11, causal=True)
    ref, _ = naive_varlen(q.double(), k.double(), v.double(), cu, True, 16**-0.5)
    assert out.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; outputs of order one land within 3e-2.
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=0)


def test_empty_sequences_are_allowed():
    q, k, v, _ = make_inputs([5, 3], 2, 1, 8)
    cu = torch.tensor([0, 5, 5, 8], dtype=torch.int32)  # the middle sequence is empty
    out = attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=False)
    ref, _ = naive_varlen(q.double(), k.double(), v.double(), torch.tensor([0, 5, 8]), False, 8**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)


def test_buckets_batch_short_sequences_and_isolate_long_ones():
    # 16 short sequences go together; a 2000-token one must not pad them all to 2000.
    buckets = plan_buckets([2000] + [50] * 16 + [0], overhead_pairs=28_000)
    assert buckets[0] == [0]
    assert sorted(i for b in buckets[1:] for i in b) == list(range(1, 17))  # the empty one is dropped
    assert len(buckets) == 2


def _cost(buckets, lengths, overhead):
    return sum(len(b) * max(lengths[i] for i in b) ** 2 + overhead for b in buckets)


@pytest.mark.parametrize("seed", range(4))
def test_buckets_are_the_cheapest_contiguous_grouping(seed):
    # Brute force over every way to cut the sorted lengths into runs: the plan costs no more.
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (9,), generator=gen).tolist()
    overhead = 20_000
    ordered = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = min(
        _cost([ordered[a:b] for a, b in zip((0,) + cuts, cuts + (len(ordered),))], lengths, overhead)
        for r in range(len(ordered))
        for cuts in itertools.combinations(range(1, len(ordered)), r)
    )
    buckets = plan_buckets(lengths, overhead)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert _cost(buckets, lengths, overhead) == best


def test_queries_do_not_pad_to_the_documents():
    # The demo step's joined towers: 16 queries of 30 tokens and 32 documents of 100.
    buckets = plan_buckets([30] * 16 + [100] * 32, overhead_pairs=16e6 / (9 * 64))
    assert [len(b) for b in buckets] == [32, 16]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(cu=torch.tensor([0, 4], dtype=torch.int32)), "stream holds"),
        (dict(max_seqlen=2), "max_seqlen"),
        (dict(kv_heads=3), "not a multiple"),
    ],
)
def test_inputs_that_cannot_be_right_are_refused(bad, message):
    kv_heads = bad.get("kv_heads", 2)
    q, k, v, cu = make_inputs([3, 3], 4, 2, 8)
    if kv_heads == 3:
        k = v = torch.randn(6, 3, 8)
    with pytest.raises(ValueError, match=message):
        attention_reference(q, k, v, cu_seqlens=bad.get("cu", cu), max_seqlen=bad.get("max_seqlen", 3), causal=True)


# ---- dispatcher ------------------------------------------------------------------------------


@pytest.fixture
def private_registry(monkeypatch):
    """Backends registered by a test disappear after it."""
    from engine.kernels.attention import dispatch

    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))


def test_dispatcher_auto_runs_the_torch_backend_on_cpu():
    q, k, v, cu = make_inputs([6, 2], 4, 2, 8)
    assert resolve_backend("auto", "cpu") == "torch"
    assert "torch" in available_backends()
    got = attention(q, k, v, cu_seqlens=cu, max_seqlen=6, causal=True)
    expected = attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=6, causal=True)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    out, lse = attention(q, k, v, cu_seqlens=cu, max_seqlen=6, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 8)


def test_registered_backends_are_picked_by_default_by_context_and_by_name(private_registry):
    calls = []

    def fake_backend(q, k, v, *, cu_seqlens, max_seqlen, causal, scale=None, return_lse=False):
        calls.append(causal)
        return torch.zeros_like(q)

    register_backend("fake_for_test", fake_backend)
    q, k, v, cu = make_inputs([4], 2, 1, 8)
    try:
        with use_backend("fake_for_test"):
            assert get_default_backend() == "fake_for_test"
            attention(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=True)
        assert get_default_backend() == "auto"
        attention(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=False, backend="fake_for_test")
        set_default_backend("fake_for_test")
        attention(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=True)
        # An explicit name wins over the default.
        real = attention(q, k, v, cu_seqlens=cu, max_seqlen=4, causal=True, backend="torch")
        assert real.abs().sum() > 0
    finally:
        set_default_backend("auto")
    assert calls == [True, False, True]


def test_lazy_backends_import_on_first_use_and_unknown_names_fail_clearly(private_registry):
    register_backend("lazy_reference_for_test", "engine.kernels.attention.reference:attention_reference")
    q, k, v, cu = make_inputs([5], 2, 2, 8)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True, backend="lazy_reference_for_test")
    assert out.shape == q.shape
    register_backend("missing_for_test", "no_such_module_anywhere:attention")
    with pytest.raises(UnknownBackendError, match="could not be imported"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True, backend="missing_for_test")
    with pytest.raises(UnknownBackendError, match="unknown attention backend 'nope'.*torch"):
        set_default_backend("nope")


def test_a_plan_made_under_inference_mode_serves_training():
    # Plans are cached per stream: one first made inside torch.inference_mode() (an encode) must not
    # hand inference tensors to a later pass that saves them for backward.
    q, k, v, cu = make_inputs([5, 3, 3], 4, 2, 8)
    with torch.inference_mode():
        attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True)
    q.requires_grad_(True)
    attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True).sum().backward()
    assert q.grad is not None


def test_many_distinct_lengths_plan_on_a_coarser_grid():
    lengths = list(range(1, 5001))  # 5,000 distinct lengths: exact planning would take seconds
    buckets = plan_buckets(lengths, overhead_pairs=28_000)
    assert sorted(i for b in buckets for i in b) == list(range(5000))
    assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in buckets)  # longest first in each
