"""The pipeline schedules as data (engine/train/pipeline_timeline.py): every action once, in an
order its inputs allow, transfers that both ends agree on, the bubble of each schedule against
(p-1)/(v m + p-1), and the activations each keeps in flight."""
from __future__ import annotations

import itertools

import pytest

from engine.model.args import ModelArgs
from engine.parallel.pipeline.stages import plan_stages
from engine.train import pipeline_timeline as pt
from engine.config import ConfigError
from engine.train.pipeline_timeline import Action, ScheduleError, bubble_fraction, peak_layers_in_flight, timeline

CASES = [(kind, pp, 1, m) for kind in ("gpipe", "1f1b") for pp in (2, 3, 4) for m in (1, 2, 3, 5, 8)]
CASES += [("interleaved", pp, v, m) for pp in (2, 4) for v in (2, 3) for m in (1, 2, 3, 4, 6, 8)]


@pytest.mark.parametrize("kind,pp,virtual,m", CASES)
def test_every_action_runs_once_after_its_inputs_and_every_transfer_is_met(kind, pp, virtual, m):
    for forward_only in (False, True):
        lines = timeline(kind, pp, virtual, m, forward_only)
        assert len({len(rank) for rank in lines}) == 1, "every rank walks the same ticks"
        ran = {}
        for rank, ticks in enumerate(lines):
            for now, tick in enumerate(ticks):
                if tick.action is not None:
                    assert tick.action.chunk % pp == rank, "chunk c runs on rank c % pp"
                    assert tick.action not in ran
                    ran[tick.action] = now
        chunks = range(pp * virtual)
        kinds = "F" if forward_only else "FB"
        assert set(ran) == {Action(k, c, i) for k in kinds for c in chunks for i in range(m)}
        for action, now in ran.items():
            for need in pt._inputs(action, pp * virtual):
                if need.kind in kinds:
                    assert ran[need] < now, (action, need)
        # Both ends list each transfer at the same tick, once.
        sent = {(now, t) for ticks in lines for now, tick in enumerate(ticks) for t in tick.sends}
        received = {(now, t) for ticks in lines for now, tick in enumerate(ticks) for t in tick.recvs}
        assert sent == received
        for now, t in sent:
            assert lines[t.src][now].sends.count(t) == 1 and t.src != t.dst
            producer = Action(t.kind, t.chunk - 1 if t.kind == "F" else t.chunk + 1, t.micro)
            assert ran[producer] == now, "sent at the end of the tick its producer ran"


@pytest.mark.parametrize("kind,pp,virtual", [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved", 4, 2),
                                              ("interleaved", 2, 2), ("1f1b", 2, 1), ("interleaved", 2, 4)])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_the_bubble_is_megatrons_formula_when_m_is_a_multiple_of_pp(kind, pp, virtual, m):
    assert bubble_fraction(kind, pp, virtual, m) == pytest.approx((pp - 1) / (virtual * m + pp - 1))


def test_interleaving_shrinks_the_bubble_and_1f1b_bounds_the_activations():
    args = ModelArgs(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=8)
    assert bubble_fraction("interleaved", 4, 2, 8) < bubble_fraction("1f1b", 4, 1, 8)
    one_f_one_b = peak_layers_in_flight("1f1b", plan_stages(args, 4), 16)
    gpipe = peak_layers_in_flight("gpipe", plan_stages(args, 4), 16)
    assert gpipe == [16 * 2] * 4  # every micro-batch's 2 layers per stage
    assert one_f_one_b == [2 * (4 - rank) for rank in range(4)]  # pp - rank micro-batches in flight


def test_a_short_last_group_falls_back_to_forwards_first_without_deadlock():
    for pp, virtual, m in itertools.product((2, 3, 4, 8), (2, 3, 4), range(1, 20)):
        timeline("interleaved", pp, virtual, m)  # raises ScheduleError on a deadlock


def test_an_order_that_waits_on_itself_is_refused(monkeypatch):
    def backwards_first(schedule, pp, virtual, m, forward_only=False):
        return [[Action("B", r, 0), Action("F", r, 0)] for r in range(pp)]

    monkeypatch.setattr(pt, "rank_orders", backwards_first)
    with pytest.raises(ScheduleError, match="deadlocks"):
        pt.timeline.__wrapped__("1f1b", 2, 1, 1)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="parallel.pp_schedule='zb'"):
        timeline("zb", 2, 1, 4)
    with pytest.raises(ConfigError, match="pp_virtual=2 needs parallel.pp_schedule=interleaved"):
        timeline("1f1b", 2, 2, 4)
