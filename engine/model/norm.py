"""RMSNorm as Llama/Qwen/Mistral define it: normalise in fp32, cast back, then scale.

`rms_norm` is one autograd node. The forward runs transformers' operations in their order (the
values are theirs, bit for bit); the backward is the closed form

    dx = r g' - x r^3 mean(g' x),   g' = (g w) in fp32,   r = 1 / sqrt(mean(x^2) + eps)

in four passes over (tokens, hidden) where autograd's graph of pow, mean, add, rsqrt, mul, cast and
mul takes about eight, and keeps x and r where autograd keeps x, x^2's inputs, r and the
normalised x. The weight's gradient is computed only when the weight trains (not under LoRA).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The spec: transformers' LlamaRMSNorm.forward."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # The weight multiplies after the cast back, as in transformers (matters in bf16).
    return weight * x32.to(dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm_reference's value and gradients, as one autograd node."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        normed = (x32 * rstd).to(x.dtype)
        if weight.dtype == normed.dtype:  # the product's own buffer: one (tokens, hidden) tensor fewer
            return normed.mul_(weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_weight, _ = ctx.needs_input_grad
        x32 = x.float()
        grad_x = grad_weight = None
        if need_x:
            grad_normed = (grad_out * weight).to(x.dtype).float()  # autograd's steps: the product, cast to x's dtype, to fp32
            dot = torch.linalg.vecdot(grad_normed, x32).unsqueeze(-1)  # (..., 1): sum(g' x) per row
            coef = dot * rstd.pow(3) / -x.shape[-1]
            grad_x = torch.addcmul(grad_normed.mul_(rstd), x32, coef).to(x.dtype)
        if need_weight:
            normed = (x32 * rstd).to(x.dtype)
            grad_weight = (grad_out * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
