"""Self-attention of one decoder layer over a packed token stream.

Projections, optional per-head q/k RMSNorm (qwen3), RoPE, then the kernels dispatcher.
The attention itself is never computed here: `kernels.attention.attention` picks the
backend, and grouped-query heads (num_kv_heads < num_heads) are passed as they are.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.model.args import ModelArgs
from engine.model.norm import RMSNorm
from engine.model.rope import apply_rotary
from engine.kernels.attention import attention


class SelfAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.causal = args.causal
        self.recompute_core = False  # Transformer.set_recompute("selective")
        # Attention across context-parallel ranks (ContextParallel.attention), set by
        # engine.parallel.parallelize; None computes it here with the kernels dispatcher.
        self.context_attention = None
        h = args.hidden_size
        self.q_proj = nn.Linear(h, args.q_size, bias=args.attention_bias)
        self.k_proj = nn.Linear(h, args.kv_size, bias=args.attention_bias)
        self.v_proj = nn.Linear(h, args.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.q_size, h, bias=args.o_proj_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                seq_lens: Tensor | None = None) -> Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, -1, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(tokens, -1, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(tokens, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, cu_seqlens, max_seqlen, seq_lens, use_reentrant=False)
        else:
            out = self._core(q, k, v, cu_seqlens, max_seqlen, seq_lens)
        return self.o_proj(out.reshape(tokens, -1))  # (T, Hq * D) -> (T, hidden)

    def _core(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              seq_lens: Tensor | None) -> Tensor:
        if self.context_attention is not None:
            return self.context_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, seq_lens=seq_lens,
                                          causal=self.causal)
        return attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=self.causal)
