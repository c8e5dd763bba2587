"""engine/model/norm.py: the one-node RMSNorm against the spec (transformers' operations), forward and
backward, in float32, bfloat16 and with a float32 weight on bfloat16 activations."""
import pytest
import torch

from engine.model.norm import rms_norm, rms_norm_reference

CASES = {  # (activation dtype, weight dtype, gradient tolerance)
    "fp32": (torch.float32, torch.float32, 1e-6),
    "bf16": (torch.bfloat16, torch.bfloat16, 2e-2),
    "bf16-fp32-weight": (torch.bfloat16, torch.float32, 2e-2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_matches_the_reference(case, weight_trains):
    dtype, weight_dtype, tol = CASES[case]
    torch.manual_seed(0)
    x = (torch.randn(2, 37, 96) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(96)).to(weight_dtype)
    grad = torch.randn(2, 37, 96).to(torch.promote_types(dtype, weight_dtype))
    results = []
    for fn in (rms_norm, rms_norm_reference):
        xi = x.clone().requires_grad_()
        wi = weight.clone().requires_grad_(weight_trains)
        out = fn(xi, wi, 1e-6)
        out.backward(grad)
        results.append((out, xi.grad, wi.grad))
    (out, gx, gw), (ref_out, ref_gx, ref_gw) = results
    assert out.dtype == ref_out.dtype and gx.dtype == ref_gx.dtype
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # the same operations in the same order
    torch.testing.assert_close(gx.float(), ref_gx.float(), atol=tol * float(ref_gx.float().abs().max()), rtol=0)
    if weight_trains:
        assert gw.dtype == ref_gw.dtype
        torch.testing.assert_close(gw.float(), ref_gw.float(), atol=tol * float(ref_gw.float().abs().max()), rtol=0)
    else:
        assert gw is None and ref_gw is None
