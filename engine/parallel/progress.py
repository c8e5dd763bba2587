"""Where each rank is, so that a collective that times out ends in one line naming who is missing.

A collective that one rank never joins fails, after train.collective_timeout, on every other rank
with the backend's message (gloo: "Timed out waiting 60000ms for recv operation to complete";
NCCL's watchdog: a sequence number): neither says which rank is missing nor what the job was
doing. Each rank therefore writes a mark, "step S: phase", into the rendezvous' key-value store at
each phase of the training loop (the forward/backward, the loss reduction, clipping, the
optimizer, a checkpoint, evaluation), and a rank whose collective failed reads every rank's mark:

    [rank 0] collective timed out at step 3 (loss all-reduce over dp) after train.collective_timeout=10 s:
    rank 1 is at step 3: forward/backward (the others are at step 3: loss all-reduce over dp) ...

The store is torchrun's (MASTER_ADDR:MASTER_PORT), keys under the run id and restart attempt.
mark() only records the phase (it runs several times per step on every rank: a store write each
would put thousands of small requests per step on one server at 128 ranks); a background thread
publishes the latest mark when it changed, every PUBLISH_EVERY_S, so what others read is at most
that old, far below any collective timeout. The same thread also counts a heartbeat (one store
add per second per rank), so a rank that died or froze whole is named even when its mark equals
everyone's: the failing rank reads the heartbeats twice, STALE_AFTER_S apart, and a rank whose
count did not move (and that did not itself give up on the collective) stopped responding:

    ... ; rank 1 stopped responding at step 3: forward/backward (this rank, 0, is at step 3: forward/backward)

A rank alive but stuck in the same phase as the others is not told apart (its heartbeat moves);
for NCCL, its flight recorder (TORCH_NCCL_DUMP_ON_TIMEOUT=1) names the collective of every rank.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from datetime import timedelta

import torch.distributed as dist

STORE_TIMEOUT_S = 5  # reading marks must not hang where the collective did
PUBLISH_EVERY_S = 1.0
STALE_AFTER_S = 3.5  # a heartbeat that did not move for this long: the rank stopped
GAVE_UP = " (gave up on the collective)"  # what a rank that failed, and explained it, leaves as its mark

# Messages the backends raise when a peer never joins or has gone (gloo, NCCL, the c10d store).
_COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                        "NCCL", "Socket Timeout", "ProcessGroupGloo", "DistBackendError", "Broken pipe")


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _COLLECTIVE_FAILURES)


class Progress:
    """This rank's marks, and the reading of everyone's when a collective failed."""

    def __init__(self, rank: int, world: int, timeout_s: float, store=None):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.store = store
        self.here = "startup"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"ember/progress/{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}/{attempt}/"
        self._published: str | None = None
        self._lock = threading.Lock()  # publish() (the thread) and _give_up() (the main thread) write the mark
        self._stop = threading.Event()
        if store is not None:
            # The thread holds only a weak reference: it ends with this object (or at stop()).
            threading.Thread(target=_publish_while_alive, args=(weakref.ref(self), self._stop),
                             name="ember-progress", daemon=True).start()

    @classmethod
    def connect(cls, rank: int, world: int, timeout_s: float) -> Progress:
        """A client of the rendezvous store (None-backed when there is none: one process)."""
        store = None
        if world > 1 and "MASTER_ADDR" in os.environ:
            try:
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False,
                                      timeout=timedelta(seconds=STORE_TIMEOUT_S))
            except (RuntimeError, ValueError):
                store = None  # marks are a diagnosis: training goes on without them
        return cls(rank, world, timeout_s, store)

    def mark(self, step: int, phase: str) -> None:
        self.here = f"step {step}: {phase}"  # published by the thread: no request on the training path

    def publish(self) -> None:
        """The latest mark if it changed, and one heartbeat."""
        with self._lock:
            self._publish_locked()

    def _publish_locked(self) -> None:
        here = self.here
        if self.store is None or self._stop.is_set():
            return
        try:
            if here != self._published:
                self.store.set(self.prefix + str(self.rank), here)
                self._published = here
            self.store.add(self.prefix + f"beat/{self.rank}", 1)
        except RuntimeError:
            pass  # a store request that timed out: the next second tries again (marks are a diagnosis)

    def stop(self) -> None:
        self._stop.set()

    def marks(self) -> dict[int, str]:
        return {rank: value.decode() for rank, value in self._read("").items()}

    def heartbeats(self) -> dict[int, int]:
        return {rank: int(value) for rank, value in self._read("beat/").items()}

    def _read(self, kind: str) -> dict[int, bytes]:
        store = self.store
        if store is None:
            return {}
        found = {}
        for rank in range(self.world):
            key = self.prefix + kind + str(rank)
            try:
                if store.check([key]):
                    found[rank] = store.get(key)
            except RuntimeError:
                return found  # the store went with its host
        return found

    def explain(self, error: BaseException) -> str:
        """One line: where this rank waited, for how long, and which ranks stopped or are elsewhere.
        Takes STALE_AFTER_S (two readings of the heartbeats); this rank keeps beating meanwhile, so
        others explaining at the same time do not take it for stopped."""
        here = self.here
        line = (f"collective failed at {here} after at most train.collective_timeout={self.timeout_s:g} s "
                f"({_first_line(error)})")
        before = self.heartbeats()
        if self.store is not None:
            time.sleep(STALE_AFTER_S)
        marks, after = self.marks(), self.heartbeats()
        self._give_up()
        if not marks:
            return line + "; the other ranks' positions could not be read (the rendezvous store is gone)"
        others = [rank for rank in range(self.world) if rank != self.rank]
        stopped = {rank: marks[rank] for rank in others
                   if rank in marks and before.get(rank) == after.get(rank) and not marks[rank].endswith(GAVE_UP)}
        away = {rank: mark for rank, mark in marks.items()
                if rank in others and rank not in stopped and mark != here and not mark.endswith(GAVE_UP)}
        parts = [f"rank {rank} stopped responding at {mark}" for rank, mark in sorted(stopped.items())]
        parts += [f"rank {rank} is at {mark}" for rank, mark in sorted(away.items())]
        parts += [f"rank {rank} never reported" for rank in others if rank not in marks]
        if not parts:
            return line + ("; no other rank stopped or is elsewhere (one is stuck inside the same phase, "
                           "or the network failed)")
        return line + "; " + ", ".join(parts) + f" (this rank, {self.rank}, is at {here})"

    def _give_up(self) -> None:
        """Leave a mark saying this rank failed on its own (others explaining must not blame it), then stop."""
        with self._lock:
            self.stop()
            self.here += GAVE_UP
            if self.store is not None:
                try:
                    self.store.set(self.prefix + str(self.rank), self.here)
                except RuntimeError:
                    pass


def _publish_while_alive(ref: weakref.ref, stop: threading.Event) -> None:
    while not stop.wait(PUBLISH_EVERY_S):
        progress = ref()
        if progress is None:
            return
        progress.publish()
        del progress


def _first_line(error: BaseException) -> str:
    """The backend's message without its source location ("[.../unbound_buffer.cc:78] Timed out ...")."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line[:200]
