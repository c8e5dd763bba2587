"""The training loop: sample, collate, forward/backward (the schedule picked once, see
engine/train/schedule.py), clip, step, log, evaluate, checkpoint, on one process or on a
parallel layout.

Parallel layouts (engine/parallel): every rank builds the same model, then parallelize()
keeps its tensor-parallel slice and FSDP2 shards the rest over data-parallel ranks. Each
step's global batch is cut into grad_accum micro-batches, and each micro-batch into dp
equal shares; the loss is the mean over the global batch whatever the layout. Only the
logging rank (0) writes metrics, logs and side files; every rank takes part in
collectives (evaluation, checkpoints, export gathering).

Step numbering: `step` in metrics.jsonl and checkpoint names counts completed optimizer
updates. The evaluation at step 0 is the zero-shot model; training line k is the update that
made step k.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import torch

from engine.config import ConfigError, RunConfig, task_loss
from engine.data.collate import Collator
from engine.data.formats import load_examples
from engine.data.mixture import load_training_data, training_sampler
from engine.data.sampler import derived_seed
from engine.data.tokenize import TextEncoder
from engine.train import checkpoint as ckpt
from engine.parallel.data import (
    clip_grad_norm,
    gather_full_parameters,
    pipeline_gradient_sync,
    reduce_mean,
    reduce_sum,
    set_gradient_sync,
)
from engine.parallel.load import fill_meta_parameters
from engine.parallel.mesh import ParallelMesh
from engine.parallel.parallelize import parallelize
from engine.parallel.pipeline.p2p import gather_to_first_stage
from engine.parallel.pipeline.stage import PipelineStage, plan_for
from engine.build import autocast_dtype, build_task_model, load_tokenizer, resolve_device, resolve_dtype
from engine.kernels.select import select_kernels
from engine.train.evaluate import evaluate_task
from engine.train.logger import MetricsLogger
from engine.train.optim import build_optimizer, build_scheduler
from engine.parallel.progress import Progress
from engine.train.faults import fault_point
from engine.train.pipeline import PipelineSchedule
from engine.train.schedule import select_forward_backward
from engine.host_memory import keep_freed_memory


class TrainingAborted(RuntimeError):
    """Too many non-finite losses in a row: training cannot go on meaningfully."""


def log(message: str) -> None:
    print(f"[ember] {message}", flush=True)


def launch_lines() -> list[str]:
    """Under torchrun: the rendezvous the ranks met at, and a restart (docs/cluster.md)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return []
    lines = [f"launch: {env.get('WORLD_SIZE')} processes on {env.get('GROUP_WORLD_SIZE', '1')} node(s), "
             f"{env.get('LOCAL_WORLD_SIZE', '?')} per node, met at {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} "
             f"(torchrun run {env['TORCHELASTIC_RUN_ID']})"]
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:
        lines.append(f"restart {restart} of at most {env.get('TORCHELASTIC_MAX_RESTARTS', '?')}: torchrun restarted "
                     "every rank after a failure; resuming as train.resume says")
    return lines


def _quiet(message: str) -> None:
    """What non-logging ranks do with progress messages."""


def _check_teacher_scores(cfg: RunConfig, examples) -> None:
    if task_loss(cfg.task) == "distill":
        missing = next((e for e in examples if e.pos_scores is None or e.neg_scores is None), None)
        if missing is not None:
            raise ConfigError(
                f"task.loss=distill needs teacher scores on every line: {missing.where} has no pos_scores/neg_scores "
                "(launch/score.py writes them with a reranker)"
            )
        short = next((e for e in examples if not e.negatives), None) if cfg.task.num_negatives else None
        if short is not None:
            raise ConfigError(f"task.loss=distill needs each query's own scored negatives: {short.where} has none "
                              "(or set task.num_negatives=0)")


class Trainer:
    def __init__(self, cfg: RunConfig, config_yaml: str, mesh: ParallelMesh | None = None):
        self.cfg = cfg
        self.config_yaml = config_yaml
        self.mesh = mesh or ParallelMesh()
        self.log = log if self.mesh.is_logging_rank else _quiet
        self.progress = Progress.connect(self.mesh.rank, self.mesh.layout.world_size, cfg.train.collective_timeout)
        self.run_dir = cfg.train.output_dir
        self.device = resolve_device(cfg.train.device)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        keep_freed_memory()  # every step frees and reallocates the same activations
        self.autocast_dtype = autocast_dtype(cfg.model, self.device)
        self.kernels = select_kernels(cfg.kernels, self.device)
        # A bad or conflicting resume request fails before any data or model is loaded.
        self.resume_from = ckpt.resolve_resume(cfg.train.resume, self.run_dir)

        # Data first: a bad file fails before any model is built.
        self.train_data = load_training_data(cfg.data, warn=self.log)
        self.train_examples = self.train_data.examples
        self.eval_examples = (
            load_examples(cfg.data.eval, on_error=cfg.data.on_error, warn=self.log) if cfg.data.eval else []
        )
        self.log(f"data: {self.train_data.describe()}"
            + (f", {len(self.eval_examples)} evaluation queries from {cfg.data.eval}" if cfg.data.eval else ""))

        _check_teacher_scores(cfg, self.train_examples)
        self.tokenizer = load_tokenizer(cfg.model)
        self.text_encoder = TextEncoder(self.tokenizer, cfg.task, cfg.data)
        # Parallel runs from a checkpoint never hold the whole model: each rank reads its slices.
        sliced_load = self.mesh.distributed and bool(cfg.model.path)
        self.model = build_task_model(cfg, self.device, self.tokenizer, meta_backbone=sliced_load)
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        parallelize(self.model, self.mesh, cfg.parallel.sequence_parallel,
                    load_weights=self._load_slices if sliced_load else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.log(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M trainable on {self.device}; "
            f"layout {self.mesh.describe()}"
            + (f", sequence parallel {'on' if cfg.parallel.sequence_parallel else 'off'}" if self.mesh.tp > 1 else ""))
        self.log(f"kernels: attention {self.kernels['attention']}, infonce {self.kernels['infonce']}")
        for line in launch_lines():
            self.log(line)

        # How a step's micro-batches become gradients: chosen here, once (engine/train/schedule.py).
        self.pipeline = self._pipeline_schedule() if self.mesh.pp > 1 else None
        self.forward_backward = select_forward_backward(
            cfg.train, self._autocast, lambda enabled: set_gradient_sync(self.model, self.mesh, enabled),
            self.pipeline)
        self.optimizer = build_optimizer(self.params, cfg.train, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.sampler = training_sampler(self.train_data, cfg.data, cfg.train.batch_size, cfg.train.seed, warn=self.log)
        self.collator = Collator(self.text_encoder, cfg.task, cfg.train.seed, warn=self.log)
        self.step = 0
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        if cfg.train.grad_accum > 1:
            self.log(f"warning: train.grad_accum={cfg.train.grad_accum} splits each step into micro-batches of "
                f"{cfg.train.batch_size // cfg.train.grad_accum} queries, which shrinks the in-batch negative pool "
                "by the same factor; train.grad_cache=true keeps the full pool")

        os.makedirs(self.run_dir, exist_ok=True)
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard,
                                    enabled=self.mesh.is_logging_rank)
        if self.mesh.is_logging_rank:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(config_yaml)
        self._maybe_resume()

    def _load_slices(self, task) -> None:
        from engine.model.hf_io import CheckpointSlices
        from engine.parallel.load import load_local_shards
        from engine.build import resolve_dtype

        slices = CheckpointSlices(self.cfg.model.path, task.backbone.args)
        dtype = resolve_dtype(self.cfg.model.dtype, self.device)
        count = load_local_shards(task, slices, dtype, self.device)
        self.log(f"read this rank's slices of {count} tensors from {self.cfg.model.path}")

    # ---- checkpoints -------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
            "skipped_steps": self.skipped_steps,
        }

    def _maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            if self.cfg.train.resume == "auto":
                self.log("train.resume=auto: no complete checkpoint yet, starting fresh")
            self.logger.truncate_after(-1)
            return
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.bad_steps_in_a_row = state["bad_steps_in_a_row"]
        self.skipped_steps = state["skipped_steps"]
        self.step = state["step"]
        self.logger.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> str:
        self.progress.mark(self.step, "checkpoint write")
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer, self._trainer_state(), self.config_yaml, self.mesh
        )
        if self.mesh.is_logging_rank:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self.log(f"saved checkpoint {path}")
        return path

    def full_model(self):
        """The trained task model whole, on CPU, as one process would hold it (for export).

        Collective: every rank gathers the shards; rank 0 gets the model, the others None. Each
        pipeline stage gathers its own parameters on its first rank, which hands them to rank 0.
        """
        if not self.mesh.distributed:
            return self.model
        full = gather_full_parameters(self.model, keep=self.mesh.first_of_stage)
        if self.mesh.pp > 1 and self.mesh.first_of_stage:
            full = gather_to_first_stage(full, self.mesh.group("pp"))
        if not self.mesh.is_logging_rank:
            return None
        # The backbone from a checkpoint stays on meta and takes the gathered tensors as they are.
        model = build_task_model(self.cfg, torch.device("cpu"), self.tokenizer,
                                 meta_backbone=bool(self.cfg.model.path))
        fill_meta_parameters(model, lambda name, param: full[name] if name in full else self._untouched(name, param))
        with torch.no_grad():
            for name, param in model.named_parameters():
                # Not in `full`: a tensor no pipeline stage held, as built (same seed) or read above.
                if name in full and param.data_ptr() != full[name].data_ptr():
                    param.copy_(full[name])
        return model

    def _untouched(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        """A backbone tensor no pipeline stage held (an untied LM head the task never reads): training
        never changed it, so it is the checkpoint's."""
        backbone_name = name.removeprefix("backbone.")
        if self.mesh.pp == 1 or backbone_name == name:
            raise KeyError(name)
        from engine.model.hf_io import CheckpointSlices

        return CheckpointSlices(self.cfg.model.path, self.model.backbone.args).read(backbone_name, dtype=param.dtype)

    def _pipeline_schedule(self) -> PipelineSchedule:
        """This rank's stage (parallelize() kept its layers) and the schedule that runs it."""
        plan = plan_for(self.model, self.mesh.pp, self.mesh.layout.virtual)
        schedule = self.cfg.parallel.pp_schedule
        self.log(f"pipeline ({schedule}): {'; '.join(plan.describe())}")
        stage = PipelineStage(self.model, plan, self.mesh.pp_rank)
        dtype = resolve_dtype(self.cfg.model.dtype, self.device)  # the residual stream's: the weights'
        return PipelineSchedule(stage, schedule, self.mesh.group("pp"), dtype, self.device,
                                pipeline_gradient_sync(self.model, stage.layers, self.mesh))

    # ---- one optimizer step ------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict:
        cfg = self.cfg.train
        self.progress.mark(self.step + 1, "batch assembly")  # a rank stuck here (data, tokenizer) is named
        indices = self.sampler.indices(self.step)
        examples = [self.train_examples[i] for i in indices]
        micro = len(examples) // cfg.grad_accum  # queries per micro-batch, over all dp ranks
        share = micro // self.mesh.dp  # this rank's queries of each micro-batch
        own_rows = range(self.mesh.dp_rank * share, (self.mesh.dp_rank + 1) * share)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Dropout draws from (seed, step, dp rank): tp ranks share masks, dp ranks (different
        # queries) do not, and a resumed run draws what the uninterrupted one did in any layout.
        torch.manual_seed(derived_seed(cfg.seed, "dropout", self.step, self.mesh.dp_rank))
        micro_batches = [
            self.collator(examples[part * micro : (part + 1) * micro], self.step, first_position=part * micro,
                          rows=own_rows).to(self.device)
            for part in range(cfg.grad_accum)
        ]
        tokens = sum(batch.num_tokens for batch in micro_batches)
        self.progress.mark(self.step + 1, "forward/backward")
        loss = self.forward_backward(self.model, micro_batches)
        fault_point("step", self.step + 1)  # the recovery tests' SIGKILL mid-step (engine/train/faults.py)
        # Every dp rank averaged over its own queries; their mean is the global batch's loss.
        self.progress.mark(self.step + 1, "loss all-reduce over dp")
        loss, tokens = reduce_mean(loss, self.mesh), reduce_sum(tokens, self.mesh)
        lr = self.optimizer.param_groups[0]["lr"]
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else math.inf
        self.progress.mark(self.step + 1, "gradient norm all-reduce")
        grad_norm = clip_grad_norm(self.params, max_norm, self.mesh)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_steps_in_a_row = 0
        else:
            self._skip_bad_step(loss)
        with warnings.catch_warnings():
            # The schedule follows the step count, skipped steps included; torch warns when the
            # very first optimizer step was the skipped one.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def _skip_bad_step(self, loss: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps_in_a_row += 1
        self.skipped_steps += 1
        self.log(f"warning: non-finite loss or gradient at step {self.step + 1} (loss={loss}); update skipped "
            f"({self.bad_steps_in_a_row} in a row, {self.skipped_steps} in total)")
        if self.bad_steps_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingAborted(
                f"{self.bad_steps_in_a_row} non-finite losses in a row (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}): lower train.lr, check the data, or use float32"
            )

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self, save_run: str | None = None) -> dict:
        if not self.eval_examples:
            return {}
        start = time.perf_counter()
        self.progress.mark(self.step, "evaluation")
        metrics = evaluate_task(
            self.model, self.text_encoder, self.eval_examples, self.cfg, self.device,
            self.autocast_dtype, save_run=save_run if self.mesh.is_logging_rank else None,
            encode=self.pipeline.encode if self.pipeline is not None else None,
        )
        record = {"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}}
        self.logger.log(record)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.log(f"eval at step {self.step} ({time.perf_counter() - start:.1f}s): {shown}")
        return metrics

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> dict:
        """Run to train.max_steps; return the zero-shot (step 0) and final evaluation metrics."""
        from tqdm import tqdm

        cfg = self.cfg.train
        results = {"zero_shot": self.evaluate() if self.step == 0 else None, "final": None}
        last_saved = self.step
        progress = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=None if self.mesh.is_logging_rank else True)
        while self.step < cfg.max_steps:
            start = time.perf_counter()
            record = self.train_step()
            record["tokens_per_s"] = record["tokens"] / max(time.perf_counter() - start, 1e-9)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.logger.log(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if progress.disable and (self.step % 5 == 0 or self.step == cfg.max_steps):
                # No terminal (CI, batch jobs, pipes): a plain line instead of the bar.
                self.log(f"step {self.step}/{cfg.max_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                    f"{record['tokens_per_s']:.0f} tokens/s")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
                last_saved = self.step
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self.evaluate()
        progress.close()
        if cfg.save_final and last_saved != self.step:
            self.save()
        # The final evaluation always runs at the end (it also writes eval.save_run).
        results["final"] = self.evaluate(save_run=self.cfg.eval.save_run or None) if self.step > 0 else results["zero_shot"]
        self.logger.close()
        return results
