"""Pipeline schedules as data: the order each pp rank runs its forwards and backwards, and the
tick-by-tick timeline every rank derives from those orders (engine/train/pipeline.py runs it).

An action is a forward F or backward B of micro-batch `micro` through chunk `chunk`, a virtual
stage of engine/parallel/pipeline/stages.py (chunk c runs on pp rank c % pp). Schedules
(parallel.pp_schedule):

gpipe        every forward, then every backward (last micro-batch first): keeps all m
             micro-batches' activations; bubble (p-1)/(m+p-1) of the time.
1f1b         Megatron's one-forward-one-backward: rank r runs p-r-1 warm-up forwards, then
             alternates, so at most p-r micro-batches' activations live at once; the same
             bubble as gpipe.
interleaved  1f1b over v virtual stages per rank (Megatron's interleaved order: groups of p
             micro-batches per chunk): the bubble shrinks to (p-1)/(v*m+p-1) of the time, at
             v times the point-to-point traffic.

Every rank simulates the same timeline from the same orders: at each tick each rank runs its next
action if its input has arrived (sent at an earlier tick), then outputs go to the neighbour stage.
So both ends of every transfer know the tick it happens at, and the executor posts a tick's sends
and receives together (one batched exchange per tick: no send waits for a receive posted later,
on gloo or NCCL). The simulation also proves the order free of deadlock, and its idle ticks are
the schedule's bubble counted in actions (a forward and a backward one tick each).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from engine.config import check_pipeline_schedule


class ScheduleError(ValueError):
    """A schedule that cannot run this many micro-batches on these stages."""


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    chunk: int  # virtual stage, 0 .. pp * virtual - 1
    micro: int  # micro-batch index

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.micro}"


@dataclass(frozen=True)
class Transfer:
    """An activation (kind "F": input of F(chunk, micro)) or a gradient (kind "B": the output gradient
    B(chunk, micro) needs) going from rank src to rank dst at the end of a tick."""

    kind: str
    chunk: int  # the consuming action's chunk
    micro: int
    src: int
    dst: int


@dataclass
class Tick:
    action: Action | None = None  # what this rank runs (None: idle)
    sends: list[Transfer] = field(default_factory=list)
    recvs: list[Transfer] = field(default_factory=list)


def rank_orders(schedule: str, pp: int, virtual: int, micro_batches: int, forward_only: bool = False
                ) -> list[list[Action]]:
    """Each pp rank's actions in the order it runs them."""
    check_pipeline_schedule(schedule, virtual)
    if micro_batches < 1:
        raise ScheduleError("a pipeline step needs at least one micro-batch")
    if schedule == "interleaved":
        return [_interleaved(rank, pp, virtual, micro_batches, forward_only) for rank in range(pp)]
    if forward_only:
        return [[Action("F", rank, i) for i in range(micro_batches)] for rank in range(pp)]
    if schedule == "gpipe":
        return [[Action("F", rank, i) for i in range(micro_batches)]
                + [Action("B", rank, i) for i in reversed(range(micro_batches))] for rank in range(pp)]
    return [_one_f_one_b(rank, pp, micro_batches) for rank in range(pp)]


def _one_f_one_b(rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    order = [Action("F", rank, i) for i in range(warmup)]
    for k in range(m - warmup):
        order += [Action("F", rank, warmup + k), Action("B", rank, k)]
    return order + [Action("B", rank, i) for i in range(m - warmup, m)]


def _interleaved(rank: int, pp: int, virtual: int, m: int, forward_only: bool) -> list[Action]:
    """Megatron's interleaved 1F1B: micro-batches in groups of pp, each group through this rank's
    first chunk, then its second, ...; backwards walk the chunks in reverse. When m is not a multiple
    of pp the last group is short and 1F1B's steady state can wait on itself (the timeline finds
    such deadlocks): then every forward runs first, as in GPipe, in the interleaved order."""
    sequence = [(local, micro) for start in range(0, m, pp) for local in range(virtual)
                for micro in range(start, min(start + pp, m))]
    forwards = [Action("F", local * pp + rank, micro) for local, micro in sequence]
    backwards = [Action("B", (virtual - 1 - local) * pp + rank, micro) for local, micro in sequence]
    if forward_only:
        return forwards
    total = len(forwards)
    warmup = total if m <= pp or m % pp else min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)
    order = forwards[:warmup]
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup:]


@lru_cache(maxsize=64)
def timeline(schedule: str, pp: int, virtual: int, micro_batches: int, forward_only: bool = False
             ) -> tuple[tuple[Tick, ...], ...]:
    """Every rank's ticks (the same length on every rank): the action it runs and the transfers it
    sends and receives at the end of each tick."""
    orders = rank_orders(schedule, pp, virtual, micro_batches, forward_only)
    chunks = pp * virtual
    done: dict[Action, int] = {}  # action -> tick it ran
    position = [0] * pp
    ticks: list[list[Tick]] = [[] for _ in range(pp)]

    def ready(action: Action, now: int) -> bool:
        return all(done.get(a, now) < now for a in _inputs(action, chunks))

    now = 0
    while any(position[r] < len(orders[r]) for r in range(pp)):
        ran = []
        for rank in range(pp):
            tick = Tick()
            if position[rank] < len(orders[rank]) and ready(orders[rank][position[rank]], now):
                tick.action = orders[rank][position[rank]]
                position[rank] += 1
                ran.append(tick.action)
            ticks[rank].append(tick)
        if not ran:
            stuck = {r: orders[r][position[r]] for r in range(pp) if position[r] < len(orders[r])}
            raise ScheduleError(f"{schedule} order deadlocks at tick {now}: waiting {stuck}")
        for action in ran:
            done[action] = now
            transfer = _output_transfer(action, pp, chunks)
            if transfer is not None:
                ticks[transfer.src][now].sends.append(transfer)
                ticks[transfer.dst][now].recvs.append(transfer)
        now += 1
    return tuple(tuple(rank_ticks) for rank_ticks in ticks)


def _inputs(action: Action, chunks: int) -> list[Action]:
    """The actions whose outputs `action` consumes: a forward the previous chunk's forward; a backward
    its own forward (the saved graph) and the next chunk's backward (its output gradient)."""
    if action.kind == "F":
        return [Action("F", action.chunk - 1, action.micro)] if action.chunk > 0 else []
    after = [Action("B", action.chunk + 1, action.micro)] if action.chunk < chunks - 1 else []
    return [Action("F", action.chunk, action.micro)] + after


def _output_transfer(action: Action, pp: int, chunks: int) -> Transfer | None:
    """Where an action's output goes: a forward's activation to the next chunk's rank, a backward's
    input gradient to the previous chunk's rank; None at the ends of the chain."""
    if action.kind == "F" and action.chunk < chunks - 1:
        nxt = action.chunk + 1
        return Transfer("F", nxt, action.micro, action.chunk % pp, nxt % pp)
    if action.kind == "B" and action.chunk > 0:
        prev = action.chunk - 1
        return Transfer("B", prev, action.micro, action.chunk % pp, prev % pp)
    return None


def bubble_formula(pp: int, virtual: int, micro_batches: int) -> float:
    """Megatron's bubble: (p-1) / (v m + p-1) of a pass."""
    return (pp - 1) / (virtual * micro_batches + pp - 1)


def bubble_fraction(schedule: str, pp: int, virtual: int, micro_batches: int) -> float:
    """Idle share of the ticks, backward counted as twice a forward (Megatron's assumption): the
    timeline's own count, to set beside bubble_formula and the measured one."""
    lines = timeline(schedule, pp, virtual, micro_batches)
    busy = sum(1 if t.action.kind == "F" else 2 for t in lines[0] if t.action is not None)
    # Weighted: replay the ticks with the weights, each rank as long as its actions and waits make it.
    finish = _weighted_makespan(lines, pp, virtual)
    return 1.0 - busy / finish


def _weighted_makespan(lines, pp: int, virtual: int) -> float:
    """The time to the last action when F costs 1 and B costs 2, each rank running its order as soon
    as its inputs are there (the ticks give the order; the weights give the time)."""
    end: dict[Action, float] = {}
    chunks = pp * virtual
    orders = [[t.action for t in rank_ticks if t.action is not None] for rank_ticks in lines]
    clock = [0.0] * pp
    position = [0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        for rank in range(pp):
            while position[rank] < len(orders[rank]):
                action = orders[rank][position[rank]]
                needs = _inputs(action, chunks)
                if not all(a in end for a in needs):
                    break
                start = max([clock[rank]] + [end[a] for a in needs])
                end[action] = clock[rank] = start + (1.0 if action.kind == "F" else 2.0)
                position[rank] += 1
                remaining -= 1
    return max(clock)


def peak_layers_in_flight(schedule: str, plan, micro_batches: int) -> list[int]:
    """Per pp rank, the most decoder layers' activations alive at once: each forward with a graph keeps
    its chunk's layers until its backward (plan: engine/parallel/pipeline/stages.py's StagePlan).
    With pp = 1 there is no pipeline: one micro-batch at a time."""
    if plan.pp == 1:
        return [len(plan.layers_of(0))]
    layers = {c.index: len(c.layers) for c in plan.chunks}
    peaks = []
    for rank_ticks in timeline(schedule, plan.pp, plan.virtual, micro_batches):
        live = peak = 0
        for tick in rank_ticks:
            if tick.action is not None:
                live += layers[tick.action.chunk] * (1 if tick.action.kind == "F" else -1)
                peak = max(peak, live)
        peaks.append(peak)
    return peaks
