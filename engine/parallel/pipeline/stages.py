"""Which layers each pipeline stage holds: contiguous runs balanced by the parameters they hold.

The backbone is a chain of units: the embedding, the decoder layers, and the head (final norm,
plus the LM head's rows when the task reads them: its weight is the embedding when tied, so the
last stage holds a copy of it). pp ranks with `virtual` stages each cut it into pp * virtual
contiguous chunks; chunk c runs on pp rank c % pp (Megatron's interleaved order), the embedding
always in the first chunk and the head in the last. The cut minimises the largest chunk's cost
(then evens out the rest), the cost of a unit being the parameters it holds: decoder layers are equal, and the embedding of a
128K vocabulary weighs about a layer of a 70B model (Megatron counts each end as one layer; here
the count follows the model). Every chunk holds at least one decoder layer.

    plan = plan_stages(args, pp=4, virtual=1)
    plan.layers_of(rank=1)     # range(20, 40)
    plan.chunks[0]             # Chunk(first=True, layers=range(0, 19), last=False, cost=...)

The dry run's memory estimate (engine/plan/memory.py) uses this same rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


class StagePlanError(ValueError):
    """The model cannot be cut into that many stages."""


@dataclass(frozen=True)
class Chunk:
    """One virtual stage: the units it holds and their parameter count."""

    index: int  # position in the chain, 0 .. pp * virtual - 1
    rank: int  # pp rank that runs it: index % pp
    layers: range  # decoder layers, global indices
    embedding: bool  # holds the token embedding (the first chunk)
    head: bool  # holds the final norm and the head (the last chunk)
    cost: int  # parameters it holds


@dataclass(frozen=True)
class StagePlan:
    pp: int
    virtual: int
    chunks: tuple[Chunk, ...]

    def chunks_of(self, rank: int) -> list[Chunk]:
        """The virtual stages pp rank `rank` runs, in chain order."""
        return [c for c in self.chunks if c.rank == rank]

    def layers_of(self, rank: int) -> list[int]:
        return [layer for c in self.chunks_of(rank) for layer in c.layers]

    def cost_of(self, rank: int) -> int:
        return sum(c.cost for c in self.chunks_of(rank))

    def describe(self) -> list[str]:
        lines = []
        for rank in range(self.pp):
            parts = []
            for c in self.chunks_of(rank):
                ends = ("embedding + " if c.embedding else "") + f"layers {c.layers.start}-{c.layers.stop - 1}"
                parts.append(ends + (" + head" if c.head else ""))
            lines.append(f"stage {rank}: " + "; ".join(parts))
        return lines


def unit_costs(args, head_rows: bool = True) -> tuple[int, int, int]:
    """(embedding, one decoder layer, head) in parameters, without tensor parallelism's split.

    head_rows: the task reads the LM head (a reranker's yes/no rows, or its export): an untied
    head is its own matrix, a tied one a copy of the embedding the last stage must hold too."""
    h, q, kv = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * args.intermediate_size
    biases = (q + 2 * kv if args.attention_bias else 0) + (h if args.o_proj_bias else 0)
    biases += (2 * args.intermediate_size + h) if args.mlp_bias else 0
    norms = 2 * h + (2 * args.head_dim if args.qk_norm else 0)
    embedding = args.vocab_size * h
    head = h + (args.vocab_size * h if head_rows else 0)
    return embedding, attention + mlp + biases + norms, head


def plan_stages(args, pp: int, virtual: int = 1, head_rows: bool = True) -> StagePlan:
    """Cut args.num_layers decoder layers (plus the embedding and the head) into pp * virtual chunks."""
    parts = pp * virtual
    if pp < 1 or virtual < 1:
        raise StagePlanError(f"pipeline stages need pp >= 1 and virtual >= 1 (got pp={pp}, virtual={virtual})")
    if args.num_layers < parts:
        raise StagePlanError(
            f"num_layers={args.num_layers} cannot fill pp={pp} x {virtual} virtual stages = {parts} chunks "
            "of at least one layer each"
        )
    embedding, layer, head = unit_costs(args, head_rows)
    bounds = _balanced_cut(args.num_layers, parts, embedding, layer, head)
    chunks = []
    for index in range(parts):
        layers = range(bounds[index], bounds[index + 1])
        first, last = index == 0, index == parts - 1
        cost = len(layers) * layer + (embedding if first else 0) + (head if last else 0)
        chunks.append(Chunk(index, index % pp, layers, first, last, cost))
    return StagePlan(pp, virtual, tuple(chunks))


def _balanced_cut(num_layers: int, parts: int, embedding: int, layer: int, head: int) -> list[int]:
    """Layer boundaries b_0 = 0 < b_1 < ... < b_parts = num_layers: the smallest possible largest chunk
    cost, then, among cuts that reach it, the most even (least sum of squared costs), then fewer layers on
    earlier chunks (they keep more micro-batches in flight under 1F1B). Exact: two small dynamic
    programs over (chunk, first layer)."""

    def cost(start: int, stop: int) -> int:
        return (stop - start) * layer + (embedding if start == 0 else 0) + (head if stop == num_layers else 0)

    def stops(chunk: int, start: int) -> range:
        return range(start + 1, num_layers - (parts - chunk - 1) + 1)  # leave a layer for each later chunk

    @lru_cache(maxsize=None)
    def least_max(chunk: int, start: int) -> int:
        if chunk == parts - 1:
            return cost(start, num_layers)
        return min(max(cost(start, stop), least_max(chunk + 1, stop)) for stop in stops(chunk, start))

    limit = least_max(0, 0)

    @lru_cache(maxsize=None)
    def most_even(chunk: int, start: int) -> tuple[float, tuple[int, ...]]:
        """(sum of squared costs, later boundaries) over cuts whose every chunk costs <= limit."""
        if chunk == parts - 1:
            last = cost(start, num_layers)
            return (float(last) ** 2 if last <= limit else float("inf")), ()
        options = []
        for stop in stops(chunk, start):
            here = cost(start, stop)
            if here <= limit:
                rest, cuts = most_even(chunk + 1, stop)
                options.append((float(here) ** 2 + rest, stop, cuts))
        if not options:
            return float("inf"), ()
        squares, stop, cuts = min(options, key=lambda o: (o[0], o[1]))
        return squares, (stop, *cuts)

    return [0, *most_even(0, 0)[1], num_layers]
