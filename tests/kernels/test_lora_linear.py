"""The fused LoRA linear against its PyTorch spec: value and every gradient (x, W, b, A, B)."""
import pytest
import torch

from engine.kernels import lora as lora_kernel
from engine.kernels.lora import _FusedLoRALinear, lora_linear, lora_linear_reference


def _inputs(shape, in_f, out_f, rank, *, bias, train_weight, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, in_f, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype, requires_grad=train_weight)
    b = torch.randn(out_f, generator=g, dtype=dtype, requires_grad=train_weight) if bias else None
    a = torch.randn(rank, in_f, generator=g, dtype=dtype, requires_grad=True)
    lb = torch.randn(out_f, rank, generator=g, dtype=dtype, requires_grad=True)
    return x, w, b, a, lb


def _grads(fn, tensors, grad_out):
    out = fn()
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("shape", [(7,), (2, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_fused_matches_reference(shape, bias, train_weight, merged, monkeypatch):
    if not merged:  # the bf16/fp16 form, checked in fp64 so that any difference is a bug, not rounding
        monkeypatch.setattr(lora_kernel, "MERGE_DTYPES", ())
    x, w, b, a, lb = _inputs(shape, 12, 10, 4, bias=bias, train_weight=train_weight)
    grad_out = torch.randn(*shape, 10, dtype=torch.float64)
    fused, fused_grads = _grads(lambda: _FusedLoRALinear.apply(x, w, b, a, lb, 2.5), (x, w, b, a, lb), grad_out)
    ref, ref_grads = _grads(lambda: lora_linear_reference(x, w, b, x, a, lb, 2.5), (x, w, b, a, lb), grad_out)
    torch.testing.assert_close(fused, ref)
    assert len(fused_grads) == len(ref_grads) == 3 + (1 + bias if train_weight else 0)
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_fused_in_float32_and_without_input_grad():
    x, w, b, a, lb = _inputs((64,), 48, 32, 8, bias=True, train_weight=False, dtype=torch.float32)
    x.requires_grad_(False)  # the first layer's input: the embedding is frozen
    out = lora_linear(x, w, b, x, a, lb, 0.5)
    out.square().sum().backward()
    ref_a, ref_b = a.detach().clone().requires_grad_(), lb.detach().clone().requires_grad_()
    lora_linear_reference(x, w, b, x, ref_a, ref_b, 0.5).square().sum().backward()
    torch.testing.assert_close(a.grad, ref_a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lb.grad, ref_b.grad, rtol=1e-4, atol=1e-4)


def test_dropout_and_autocast_take_the_reference_path():
    x, w, b, a, lb = _inputs((6,), 8, 8, 2, bias=False, train_weight=False, dtype=torch.float32)
    dropped = torch.nn.functional.dropout(x, 0.5)
    out = lora_linear(x, w, b, dropped, a, lb, 1.0)
    assert out.grad_fn.name() == "AddBackward0"  # the spec's graph: the adapter reads the dropped input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, w, b, x, a, lb, 1.0)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == "AddBackward0"
    assert lora_linear(x, w, b, x, a, lb, 1.0).grad_fn.name() == "_FusedLoRALinearBackward"
