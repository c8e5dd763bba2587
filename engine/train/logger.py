"""Run outputs that people read: metrics.jsonl (one JSON object per line) and TensorBoard."""
from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    def __init__(self, run_dir: str, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted run wrote past the checkpoint it resumes from."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash we are resuming from
                if record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
