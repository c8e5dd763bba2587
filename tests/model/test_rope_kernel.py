"""engine/model/rope.py apply_rotary (one autograd node, no rotate_half copy) against the spec,
transformers' x cos + rotate_half(x) sin: forward and backward, float32 and bfloat16, with
halves of sin that differ (so a backward that swapped them would fail)."""
import pytest
import torch

from engine.model.rope import apply_rotary, apply_rotary_reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_apply_rotary_matches_the_reference(dtype, tol):
    torch.manual_seed(0)
    tokens, heads, dim = 29, 3, 16
    x = torch.randn(tokens, heads, dim).to(dtype)
    angles = torch.randn(tokens, dim)  # not rotate_half's (freqs, freqs) layout: halves differ
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grad = torch.randn(tokens, heads, dim).to(dtype)
    results = []
    for fn in (apply_rotary, apply_rotary_reference):
        xi = x.clone().requires_grad_()
        out = fn(xi, cos, sin)
        out.backward(grad)
        results.append((out, xi.grad))
    (out, gx), (ref_out, ref_gx) = results
    assert out.dtype == ref_out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # the same roundings in the same order
    torch.testing.assert_close(gx.float(), ref_gx.float(), atol=tol * 4, rtol=0)
