"""Training checkpoints with torch.distributed.checkpoint (DCP).

Layout: RUN/checkpoints/step_XXXXXXXX/ holding the DCP shards of the trainable parameters
and the optimizer, plus trainer_state.json (step, scheduler, sampler, counters) and the run's
config.yaml. A checkpoint is written under a temporary name and renamed when complete, so a
folder named step_XXXXXXXX is always whole; resume never looks at anything else.

With LoRA only the adapters (and any task head) are trainable: the frozen base weights come
back from model.path, so they are not written again.

Parallel runs: every rank writes its own shards (tensor-parallel slices and FSDP shards are
DTensors with global names and shapes), so a checkpoint saved at one (tp, dp) layout loads
at any other, including one process. Rank 0 alone creates, completes and renames the folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from engine.train.faults import fault_point

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


@contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _options(strict: bool = True) -> StateDictOptions:
    # Loading must not be strict: the frozen base weights are deliberately absent. The optimizer's
    # state and hyperparameters are keyed by parameter name (flattened), not by position in a
    # param group: a pipeline stage holds another set of parameters in each layout, and positions
    # would not carry over when a run resumes with another pp.
    return StateDictOptions(ignore_frozen_params=True, strict=strict, flatten_optimizer_state_dict=True)


def save_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict, config_yaml: str,
                    mesh=None) -> str:
    """Collective when `mesh` is distributed: every rank calls it with its own shards."""
    lead = mesh is None or mesh.is_logging_rank
    final = checkpoint_dir(run_dir, step)
    # One name every rank agrees on; a stale one from a crashed save is cleared first.
    tmp = final + ".tmp"
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(mesh)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    # No RNG state: dropout is reseeded from (seed, step, dp rank) every step (Trainer.train_step).
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    fault_point("checkpoint", step)  # the recovery tests' SIGKILL mid-write (engine/train/faults.py)
    _barrier(mesh)
    if lead:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
        # Written last: its presence marks the folder's content complete even before the rename.
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, **trainer_state}, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier(mesh)
    return final


def _barrier(mesh) -> None:
    if mesh is not None:
        mesh.barrier()


def is_complete(path: str) -> bool:
    return (
        _STEP_DIR.match(os.path.basename(os.path.normpath(path))) is not None
        and os.path.isfile(os.path.join(path, STATE_FILE))
        and os.path.isfile(os.path.join(path, ".metadata"))
    )


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [os.path.join(root, name) for name in sorted(os.listdir(root)) if _STEP_DIR.match(name)]
    return [p for p in found if is_complete(p)]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(path: str, model, optimizer=None) -> dict:
    """Restore trainable parameters (and the optimizer when given) in place; return trainer state."""
    if not is_complete(path):
        raise ValueError(f"train.resume={path}: not a complete checkpoint folder (step_XXXXXXXX with {STATE_FILE})")
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_state_dict(model, [], options=_options())[0]}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer if optimizer is not None else [],
        model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
        options=_options(strict=False),
    )
    return read_trainer_state(path)


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """train.resume: null or "" (fresh), 'auto' (newest complete checkpoint, or fresh), or a folder."""
    if not resume:
        if list_checkpoints(run_dir):
            from engine.config import ConfigError

            raise ConfigError(
                f"train.output_dir={run_dir} already holds checkpoints of a run: train.resume=auto continues it, "
                "or pick another train.output_dir"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if not is_complete(resume):
        from engine.config import ConfigError

        raise ConfigError(f"train.resume={resume}: not a complete checkpoint folder (step_XXXXXXXX with {STATE_FILE})")
    return resume
