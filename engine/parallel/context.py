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

import torch
from torch import Tensor


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
