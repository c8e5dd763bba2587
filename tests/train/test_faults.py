"""EMBER_FAULT (engine/train/faults.py): a malformed value is refused naming the variable and the form;
a fault fires only on the named rank, step and point, and never after a restart. The kill and hang
themselves are exercised on real processes by tests/cluster/."""
from __future__ import annotations

import pytest

from engine.train import faults


def test_a_malformed_fault_names_the_variable_and_the_form(monkeypatch):
    monkeypatch.setenv("EMBER_FAULT", "explode:rank=1:step=3:at=step")
    with pytest.raises(ValueError, match=r"EMBER_FAULT='explode:rank=1:step=3:at=step': expected kill\|hang"):
        faults.fault_point("step", 3)
    monkeypatch.setenv("EMBER_FAULT", "kill:rank=1:step=3:at=optimizer")
    with pytest.raises(ValueError, match="at=step|checkpoint"):
        faults.fault_point("step", 3)


def test_a_fault_fires_only_where_it_is_named(monkeypatch):
    fired = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: fired.append(sig))
    monkeypatch.setenv("EMBER_FAULT", "kill:rank=1:step=3:at=checkpoint")
    monkeypatch.setenv("RANK", "1")
    for at, step in (("step", 3), ("checkpoint", 2), ("checkpoint", 4)):
        faults.fault_point(at, step)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    faults.fault_point("checkpoint", 3)  # a restarted job runs through
    assert fired == []
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    faults.fault_point("checkpoint", 3)
    assert fired == [faults.signal.SIGKILL]
