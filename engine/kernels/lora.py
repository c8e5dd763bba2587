"""A LoRA-adapted linear layer as one autograd node: y = x W^T + b + (x A^T) B^T * scaling.

The spec is the three-line PyTorch expression (`lora_linear_reference`), which autograd runs as
five nodes: two adapter matmuls, a scale (mul), an add, and the base linear. Each of the mul and
the add reads and writes a (tokens, out_features) tensor, forward and backward, for every adapted
projection: on the demo step (SmolLM2-135M, LoRA on all seven projections, CPU fp32) those
passes took 1.1 s of an 8.1 s step (torch.profiler; docs/performance.md "Profile of the training
step"). Here the scale and the add are folded into the matmuls' accumulation (addmm's alpha/beta),
and the backward computes the adapter's gradient (T, r) once and reuses it for both dA and dx:

    forward   u = x A^T                      (T, r)      saved with x
              y = addmm(b, x, W^T); y += s u B^T
    backward  gu = s g B                     (T, r)
              dx = g W + gu A                one addmm
              dA = gu^T x,  dB = s g^T u,  dW = g^T x (only when W trains),  db = sum g

In fp32 (and fp64) the forward goes further: y = x (W + s B A)^T, one matmul per call instead of
three, and the backward's dx = g (W + s B A) likewise, the (out, in) sum rebuilt there (a rank-r
product, r/T of the main matmul) and u recomputed for dB. In bf16/fp16 weights the sum would
round the small update away into the weight's 8 (11) mantissa bits, so they keep the unmerged form.

Only for the common case: no adapter dropout (its mask would be a second input to save) and no
autocast (the backward would run outside it with mixed dtypes). Otherwise the reference runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# Weight dtypes precise enough to hold W + s B A without losing the update to rounding.
MERGE_DTYPES = (torch.float32, torch.float64)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, adapter_input: Tensor,
                          lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The spec: base linear plus the scaled low-rank update of `adapter_input` (x, or dropout(x))."""
    return F.linear(x, weight, bias) + F.linear(F.linear(adapter_input, lora_a), lora_b) * scaling


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, adapter_input: Tensor,
                lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """lora_linear_reference's value and gradients; fused when the adapter reads x itself."""
    if adapter_input is not x or torch.is_autocast_enabled(x.device.type):
        return lora_linear_reference(x, weight, bias, adapter_input, lora_a, lora_b, scaling)
    return _FusedLoRALinear.apply(x, weight, bias, lora_a, lora_b, scaling)


class _FusedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.merged = weight.dtype in MERGE_DTYPES
        if ctx.merged:
            out = F.linear(rows, _merged_weight(weight, lora_a, lora_b, scaling), bias)
            ctx.save_for_backward(x, weight, lora_a, lora_b)
        else:
            low_rank = rows @ lora_a.t()  # (T, r)
            out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
            out.addmm_(low_rank, lora_b.t(), alpha=scaling)
            ctx.save_for_backward(x, weight, lora_a, lora_b, low_rank)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lora_a, lora_b, *saved = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        scaling = ctx.scaling
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        rows = x.reshape(-1, x.shape[-1])  # (T, in)
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        if need_a or (need_x and not ctx.merged):
            grad_low_rank = (grad @ lora_b).mul_(scaling)  # (T, r): d loss / d (x A^T)
        if need_x and ctx.merged:
            grad_x = (grad @ _merged_weight(weight, lora_a, lora_b, scaling)).view(x.shape)
        elif need_x:
            grad_x = (grad @ weight).addmm_(grad_low_rank, lora_a).view(x.shape)
        if need_w:
            grad_w = grad.t() @ rows
        if need_b and ctx.has_bias:
            grad_bias = grad.sum(0)
        if need_a:
            grad_a = grad_low_rank.t() @ rows
        if need_lb:
            low_rank = rows @ lora_a.t() if ctx.merged else saved[0]
            grad_lb = (grad.t() @ low_rank).mul_(scaling)
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None


def _merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """W + s B A (out, in): a transient, built per call (2 r out in FLOPs), never stored."""
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)
