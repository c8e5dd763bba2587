"""Deliberate failures, for the recovery tests (tests/cluster/): a rank that dies or stops at a
chosen point of a chosen step, so a restart can be tested on the same point every try.

    EMBER_FAULT="kill:rank=1:step=3:at=step"          SIGKILL inside step 3's forward/backward
    EMBER_FAULT="kill:rank=1:step=4:at=checkpoint"    SIGKILL after writing its shards of checkpoint 4
    EMBER_FAULT="hang:rank=1:step=3:at=step"          stop joining collectives (sleep) in step 3

Points: `step` (after the step's gradients, before the optimizer: the other ranks are in or near
the gradient reduction), `checkpoint` (the rank has written its shard files, the checkpoint is not
yet complete). A fault fires on the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT is 0),
so a restarted job runs through. Unset (the normal case), fault_point() is one dict lookup.
"""
from __future__ import annotations

import os
import signal
import sys
import time

POINTS = ("step", "checkpoint")


def _parse(spec: str) -> dict:
    kind, *fields = spec.split(":")
    fault = {"kind": kind, **dict(field.split("=", 1) for field in fields)}
    if kind not in ("kill", "hang") or fault.get("at") not in POINTS or "step" not in fault:
        raise ValueError(f"EMBER_FAULT={spec!r}: expected kill|hang:rank=R:step=S:at=step|checkpoint")
    return fault


def fault_point(at: str, step: int) -> None:
    """Called by the trainer at each point; acts only when EMBER_FAULT names this rank, step and point."""
    spec = os.environ.get("EMBER_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    fault = _parse(spec)
    rank = int(os.environ.get("RANK", "0"))
    if fault["at"] != at or int(fault["step"]) != step or int(fault.get("rank", "0")) != rank:
        return
    print(f"[ember] EMBER_FAULT: rank {rank}: {fault['kind']} at the {at} point of step {step}", file=sys.stderr,
          flush=True)
    if fault["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        return  # not reached: SIGKILL cannot be caught
    while True:  # hang: alive, joining nothing
        time.sleep(60)
