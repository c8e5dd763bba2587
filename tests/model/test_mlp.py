"""engine/model/mlp.py swiglu: in place without a gradient to record, the same values as
silu(gate) * up; with one, out of place (gate untouched, the gradient autograd's own)."""
import torch
import torch.nn.functional as F

from engine.model.mlp import swiglu


def test_swiglu_in_place_only_without_gradients():
    torch.manual_seed(0)
    gate, up = torch.randn(7, 12), torch.randn(7, 12)
    expected = F.silu(gate) * up
    with torch.no_grad():
        buffer = gate.clone()
        out = swiglu(buffer, up)
    assert out.data_ptr() == buffer.data_ptr()  # written into the gate's buffer
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(swiglu(gate.clone(), up), expected, atol=0, rtol=0)

    trained = gate.clone().requires_grad_()
    out = swiglu(trained, up)
    assert out.data_ptr() != trained.data_ptr()
    out.sum().backward()
    reference = gate.clone().requires_grad_()
    (F.silu(reference) * up).sum().backward()
    torch.testing.assert_close(trained.grad, reference.grad, atol=0, rtol=0)
