"""Ring attention: key/value blocks pass round the ring of context-parallel ranks.

STUB (frozen interface); being written.
"""
from __future__ import annotations

from torch import Tensor


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, seq_lens: Tensor, causal: bool,
                   group, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Attention of this rank's share of a packed stream split by engine.parallel.context.shard_for_ring.

    q (n, Hq, D), k/v (n, Hkv, D): this ring rank's local stream (n = cu_seqlens[-1]);
    cu_seqlens (num_seqs + 1,) int32: the local stream's sequences, identical on every ring rank;
    seq_lens (num_seqs,): each sequence's real length (positions >= it are pads, never attended
    as keys in bidirectional attention); causal: zigzag split (2R chunks) if True, plain split (R) if False.
    Returns (n, Hq, D) in q's dtype; differentiable in q, k, v.
    """
    raise NotImplementedError
