"""Rotary position embeddings, computed on the fly for arbitrary (packed) positions.

Only inv_freq is cached. cos/sin are built per forward from position_ids, in fp32, so
positions that restart at 0 for every packed sequence need no special casing, and no
(max_positions, head_dim) table is kept for 32K contexts. The frequency formulas
('default', 'linear', 'llama3') and the rotate_half convention are transformers' own,
operation for operation, so fp32 results match bit for bit.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from engine.model.args import ModelArgs


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """(head_dim // 2,) fp32 on CPU: the rotation frequency of each dimension pair."""
    dim = args.head_dim
    # Explicit device: stays real even when the model is built under `torch.device('meta')`.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1's frequency-dependent scaling (transformers' _compute_llama3_parameters)."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for given positions. Not an nn.Module: it has no state worth saving."""

    def __init__(self, args: ModelArgs):
        self._inv_freq_cpu = rope_inv_freq(args)
        self._inv_freq_on: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq_on[device]

    def __call__(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (T,) -> cos, sin (T, head_dim) in `dtype`, computed in fp32."""
        freqs = position_ids[:, None].float() * self.inv_freq(position_ids.device)  # (T, head_dim // 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim), rotate_half layout
        # Cast like transformers does, so reduced-precision runs round the same way.
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The spec, transformers' apply_rotary_pos_emb: x (T, heads, head_dim) rotated by cos/sin (T, head_dim)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rotary_reference's value and gradient as one autograd node, without rotate_half's
    negated copy and concatenation: x cos, then each half's sin term added in place (three passes
    over x where the spec takes five, and the same in the backward). The forward's values are the
    spec's, bit for bit.
    cos and sin come from positions and take no gradient."""
    if cos.requires_grad or sin.requires_grad:
        return apply_rotary_reference(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + rotate_half(x) sin, with cos/sin (T, 1, head_dim) broadcast over heads."""
    half = x.shape[-1] // 2
    out = x * cos
    # A product, then a subtract/add, not addcmul_: its fused multiply-add rounds once where
    # transformers rounds twice, and the forward is theirs bit for bit.
    out[..., :half].sub_(x[..., half:] * sin[..., :half])
    out[..., half:].add_(x[..., :half] * sin[..., half:])
    return out


def _rotate_transposed(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of _rotate: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 give
    dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1."""
    half = grad.shape[-1] // 2
    out = grad * cos
    out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
    out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos, sin = cos[:, None, :], sin[:, None, :]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_transposed(grad_out, cos, sin), None, None
