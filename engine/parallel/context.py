"""Context parallelism: one packed stream of sequences split over ring x ulysses ranks.

How a packed row is cut (Megatron's THD scheme), for ring degree R:
- every sequence is cut into C chunks: C = 2R for causal attention with R > 1 (zigzag),
  otherwise C = R (plain split); a sequence of length L is padded at its end to
  P = ceil(L / C) * C, so even a sequence shorter than C has a chunk on every rank;
- ring rank r holds chunks r and C-1-r of every sequence (zigzag: each rank gets one early
  and one late chunk, so causal work is equal), or chunk r (plain split);
- the rank's local stream is those parts, sequence after sequence: its cu_seqlens are
  cumsum(P / R), the same on every ring rank, and each token keeps its global position
  (RoPE is unchanged); pads are positions >= L.

Ulysses (degree U) then splits the ring-local stream into U equal slices of tokens (and,
with Megatron sequence parallelism, each slice into tp slices); attention undoes that
split by its all-to-all. The ring-local stream is padded with one filler sequence, which
attends only to itself, so its length divides by U x tp.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from engine.parallel.collectives import all_reduce_copy, mapped


def ring_chunks(ring: int, causal: bool) -> int:
    """Chunks each sequence is cut into: 2R for causal zigzag, R for the plain split."""
    return 2 * ring if causal and ring > 1 else ring


@dataclass
class RingShard:
    """What ring rank `rank` holds of a packed stream; see the module docstring."""

    index: Tensor  # (n_local,) int64: the global stream index of each local token, -1 for a pad
    positions: Tensor  # (n_local,) int64: each local token's position within its sequence
    cu_seqlens: Tensor  # (num_seqs + 1,) int32: the local stream, identical on every ring rank
    seq_lens: Tensor  # (num_seqs,) int64: the real (unpadded) length of each sequence


def shard_for_ring(cu_seqlens: Tensor, ring: int, rank: int, causal: bool) -> RingShard:
    """Rank `rank`'s share of the stream described by the global cu_seqlens."""
    device = cu_seqlens.device
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]  # (n,)
    chunks = ring_chunks(ring, causal)
    chunk = (lengths + chunks - 1) // chunks  # (n,) chunk size of each sequence
    chunk = torch.clamp(chunk, min=1)  # an empty sequence still gets one (pad) token per chunk
    held = (rank, chunks - 1 - rank) if chunks == 2 * ring else (rank,)
    local = chunk * len(held)  # (n,) tokens of each sequence on this rank
    local_cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    local_cu[1:] = torch.cumsum(local, 0)
    total = int(local_cu[-1])
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), local, output_size=total)
    offset = torch.arange(total, device=device) - local_cu[:-1].long()[seq]  # within the sequence's local part
    held_t = torch.tensor(held, device=device)
    which = offset // chunk[seq]  # 0, or 1 for the zigzag's late chunk
    positions = held_t[which] * chunk[seq] + offset % chunk[seq]
    index = torch.where(positions < lengths[seq], cu[:-1][seq] + positions, torch.full_like(positions, -1))
    return RingShard(index=index, positions=positions, cu_seqlens=local_cu, seq_lens=lengths)


@dataclass
class LocalStream:
    """What one rank runs the decoder on: its tokens of the ring-local stream (see ContextParallel.shard)."""

    input_ids: Tensor  # (n / ulysses,) this rank's ulysses slice of the ring-local stream
    position_ids: Tensor  # (n / ulysses,) global positions within each sequence
    cu_seqlens: Tensor  # (num_seqs + 2,) int32: the ring-local stream of n tokens, filler sequence last
    max_seqlen: int
    seq_lens: Tensor  # (num_seqs + 1,) real lengths of the global sequences (and the filler's)
    index: Tensor  # (n / ulysses,) global stream index of each token, -1 for pads and filler


class ContextParallel:
    """Splits each forward's packed stream over ring x ulysses ranks and attends across them.

    Installed on a Transformer by engine.parallel.parallelize when ring * ulysses > 1. Every
    rank of a context-parallel group passes the same whole batch; `shard` picks this rank's
    tokens, `attention` is what each layer's attention core calls, `unshard` puts the final
    hidden states back at their global stream rows (zeros where another rank holds the token),
    and `reduce` sums per-sequence results (pooled vectors, scores) over the group.
    """

    def __init__(self, mesh, causal: bool, tokens_multiple: int = 1):
        layout = mesh.layout
        self.ring, self.ulysses, self.causal = layout.ring, layout.ulysses, causal
        self.ring_rank, self.ulysses_rank = mesh.local_rank("ring"), mesh.local_rank("ulysses")
        self.ring_group = mesh.group("ring") if self.ring > 1 else None
        self.ulysses_group = mesh.group("ulysses") if self.ulysses > 1 else None
        self.group = mesh.group("cp")
        # The ring-local stream splits into ulysses slices, each of them into tp slices under
        # Megatron sequence parallelism.
        self.tokens_multiple = self.ulysses * tokens_multiple
        self._plan_key = None  # (cu_seqlens, seq_lens, causal, ring block plan) of the last stream

    def shard(self, input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor) -> LocalStream:
        ring = shard_for_ring(cu_seqlens, self.ring, self.ring_rank, self.causal)
        real = ring.index >= 0
        safe = ring.index.clamp(min=0)
        ids = torch.where(real, input_ids[safe], torch.zeros_like(safe))
        positions = torch.where(real, position_ids.long()[safe], ring.positions)
        filler = self._filler_length(int(ring.cu_seqlens[-1]))
        cu = torch.cat([ring.cu_seqlens, ring.cu_seqlens[-1:] + filler])
        seq_lens = torch.cat([ring.seq_lens, ring.seq_lens.new_tensor([filler * self.ring])])
        ids = torch.cat([ids, ids.new_zeros(filler)])
        positions = torch.cat([positions, torch.arange(filler, device=positions.device)])
        index = torch.cat([ring.index, ring.index.new_full((filler,), -1)])
        mine = slice(self.ulysses_rank * len(ids) // self.ulysses, (self.ulysses_rank + 1) * len(ids) // self.ulysses)
        lengths = cu[1:] - cu[:-1]
        return LocalStream(ids[mine], positions[mine], cu, int(lengths.max()) if len(lengths) else 0,
                           seq_lens, index[mine])

    def _filler_length(self, tokens: int) -> int:
        """Tokens to append so the ring-local stream splits evenly; even under zigzag, whose
        sequences are two equal chunks on every rank."""
        filler = -tokens % self.tokens_multiple
        if filler % 2 and self.causal and self.ring > 1:
            filler += self.tokens_multiple  # tokens is even here, so an odd multiple makes it even
        return filler

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int,
                  seq_lens: Tensor, causal: bool) -> Tensor:
        """q (n/U, Hq, D), k/v (n/U, Hkv, D): this rank's tokens -> (n/U, Hq, D)."""
        from engine.parallel.ring import ring_attention
        from engine.parallel.ulysses import ulysses_attention
        from engine.kernels.attention import attention

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # the whole ring-local stream, some heads
            if self.ring > 1:
                return ring_attention(q, k, v, cu_seqlens=cu_seqlens, seq_lens=seq_lens, causal=causal,
                                      group=self.ring_group, plan=self._ring_plan(cu_seqlens, seq_lens, causal))
            return attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal)

        if self.ulysses > 1:
            return ulysses_attention(q, k, v, group=self.ulysses_group, attend=attend)
        return attend(q, k, v)

    def _ring_plan(self, cu_seqlens: Tensor, seq_lens: Tensor, causal: bool) -> list:
        """One ring block plan per stream, not per layer: every layer (and its recompute) passes the
        stream's own cu_seqlens and seq_lens tensors, and the cache holds them, so identity is safe."""
        from engine.parallel.ring import plan_ring_blocks

        key = self._plan_key
        if key is None or key[0] is not cu_seqlens or key[1] is not seq_lens or key[2] != causal:
            plan = plan_ring_blocks(cu_seqlens, seq_lens, causal=causal, group=self.ring_group)
            self._plan_key = (cu_seqlens, seq_lens, causal, plan)
        return self._plan_key[3]

    def pool(self, hidden: Tensor, stream: LocalStream, cu_seqlens: Tensor, mode: str) -> Tensor:
        """(n/U, H) of this rank's tokens -> (num_seqs, H): this rank's share of pooling the global
        stream (cu_seqlens), to be summed over the group by reduce(); never builds the whole stream."""
        from engine.model.pooling import pool_rows

        real = stream.index >= 0
        return pool_rows(hidden[real], stream.index[real], cu_seqlens, mode)

    def unshard(self, hidden: Tensor, stream: LocalStream, tokens: int) -> Tensor:
        """(n/U, H) of this rank's tokens -> (tokens, H) in global stream order, zeros elsewhere."""
        real = stream.index >= 0
        return hidden.new_zeros(tokens, hidden.shape[-1]).index_copy(0, stream.index[real], hidden[real])

    def reduce(self, x: Tensor) -> Tensor:
        """The sum over the context-parallel group of per-sequence partial results.

        Every rank then computes the same loss from it, so each rank's gradient of its partial
        result is the gradient of the sum. The backward multiplies it by the group size: FSDP
        averages gradients over dp x ring x ulysses, but the ring x ulysses ranks hold parts of one
        gradient, which must be summed (FSDP's own divide factor needs PREMUL_SUM, which gloo lacks).
        Every parameter's gradient flows through here, so this is the whole correction."""
        size = self.ring * self.ulysses
        return mapped(x, partial(all_reduce_copy, group=self.group), lambda grad: grad * size)
