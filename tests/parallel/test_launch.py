"""The parallel layouts through the real entry point: `torchrun ... launch/train.py` on gloo/CPU.

A tiny random model trains for 5 steps on synthetic data, once in one plain process (the
reference) and in each layout; every run is a separate torchrun (or python) subprocess, as a
user would start it. Checked:
- tp 2 x dp 2 (4 ranks) and dp 4 log the reference's losses in metrics.jsonl (relative 1e-4);
- a checkpoint saved at tp 2 x dp 2 (step 3) resumes at tp 4 and in one plain process, in new
  output folders, and steps 4 and 5 log the uninterrupted reference's losses (DCP reshards);
- the tp 2 x dp 2 run's export (rank 0 gathers every shard) holds the reference export's tensors;
- full fine-tuning and LoRA alike for the three checks above;
- each invalid layout fails with its one-line config error (exit 2, no traceback, no run folder)
  before any process group exists, so those cases need no torchrun: WORLD_SIZE in the env is enough;
- a user error under torchrun is reported by every rank, each line prefixed "[rank N]".
The reference and the tp 2 x dp 2 runs are shared by the tests (run once per module).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.model.hf_io import read_safetensors
from engine.parallel.spawn import free_port
from tests.conftest import REPO, read_metrics, synthetic_examples, write_jsonl

STEPS = 5
SAVE_AT = 3
# AdamW moves every weight by about lr at its first step whatever the gradient's size, so an
# element whose gradient is near zero takes its direction from rounding, which differs between
# layouts; the loss gap this leaves grows with lr. Measured at tp 2 x dp 2: up to 8e-5 relative
# at lr 1e-3 (too close to 1e-4), up to 3e-6 at lr 1e-4, where 5 steps of training still move
# the loss by 1e-3 to 2e-2 relative (a resume that restored nothing would show).
LR = 1e-4
# The repository's tiny experiment (conf/exp/tiny.yaml), as a user would name it; no evaluation
# and no final checkpoint: only the losses, the step-3 checkpoint and exports matter.
TINY = ["+exp=tiny", "data.eval=", f"train.lr={LR}", "train.save_final=false", f"train.max_steps={STEPS}"]
FINETUNE = {"full": [], "lora": ["lora.rank=4"]}
LAYERS4 = ["model.num_layers=4"]
LOSS_RTOL = 1e-4



def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def launch(nproc: int, *args: str, torchrun_args: tuple[str, ...] = (), env: dict | None = None):
    """launch/train.py under torchrun with nproc ranks, or as a plain process when nproc is 0."""
    script = os.path.join(REPO, "launch", "train.py")
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *torchrun_args, script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env or _env())


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected), (got, expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=LOSS_RTOL), (step, got, expected)


class Runs:
    """Training runs by name, each started once and shared by every test that reads it."""

    def __init__(self, root, train_file: str):
        self.root = root
        self.train_file = train_file
        self.done: dict[str, str] = {}

    def get(self, name: str, nproc: int, *overrides: str, export: bool = True) -> str:
        """The run's folder; with export, its export is RUN_DIR-export (each export checks itself
        in sentence-transformers and transformers: seconds per run, spent only where a test reads it)."""
        if name not in self.done:
            run_dir = str(self.root / name)
            exporting = [f"export.output_dir={run_dir}-export"] if export else []
            result = launch(nproc, *TINY, f"data.train={self.train_file}", f"train.output_dir={run_dir}",
                            *exporting, *overrides)
            assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
            self.done[name] = run_dir
        return self.done[name]

    def reference(self, tune: str) -> str:
        """One plain process, uninterrupted."""
        return self.get(f"single-{tune}", 0, *FINETUNE[tune])

    def tp2_dp2(self, tune: str) -> str:
        """4 ranks, tp 2 x dp 2, saving at step 3 (the source of the resharding resumes)."""
        return self.get(f"tp2xdp2-{tune}", 4, "parallel.tp=2", f"train.save_every={SAVE_AT}", *FINETUNE[tune])

    def reference4(self, tune: str) -> str:
        """One plain process, uninterrupted, on the tiny model with 4 layers (room for 4 stages)."""
        return self.get(f"single4-{tune}", 0, *LAYERS4, *FINETUNE[tune])

    def pp2_tp2(self, tune: str) -> str:
        """4 ranks, 2 pipeline stages x tp 2, 4 layers, saving at step 3."""
        return self.get(f"pp2xtp2-{tune}", 4, *LAYERS4, "parallel.pp=2", "parallel.tp=2",
                        f"train.save_every={SAVE_AT}", *FINETUNE[tune])


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    return write_jsonl(root / "train.jsonl", synthetic_examples(24, seed=0, with_scores=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_file) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), train_file)


# ---- the same losses in every layout ------------------------------------------------------
@pytest.mark.parametrize("tune", ["full", "lora"])
def test_tp2_x_dp2_logs_the_single_process_losses(runs, tune):
    expected = losses(runs.reference(tune))
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert_same_losses(losses(runs.tp2_dp2(tune)), expected)


def test_dp4_at_equal_global_batch_logs_the_single_process_losses(runs):
    # train.batch_size=8 over dp 4: two queries per rank, the others' candidates as negatives.
    assert_same_losses(losses(runs.get("dp4-full", 4, export=False)), losses(runs.reference("full")))


# ---- checkpoints reshard between layouts --------------------------------------------------
@pytest.mark.parametrize("tune", ["full", "lora"])
@pytest.mark.parametrize("nproc, layout", [(4, ["parallel.tp=4"]), (0, [])], ids=["tp4", "one-process"])
def test_checkpoint_of_tp2_x_dp2_resumes_in_another_layout(runs, tmp_path, tune, nproc, layout):
    checkpoint = os.path.join(runs.tp2_dp2(tune), "checkpoints", f"step_{SAVE_AT:08d}")
    assert os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
    run_dir = tmp_path / "resumed"
    result = launch(nproc, *TINY, f"data.train={runs.train_file}", f"train.output_dir={run_dir}",
                    f"train.resume={checkpoint}", *layout, *FINETUNE[tune])
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(runs.reference(tune))
    # The new folder's metrics start after the checkpoint: steps 4 and 5 only.
    assert_same_losses(losses(run_dir), {s: expected[s] for s in range(SAVE_AT + 1, STEPS + 1)})


# ---- pipeline stages: the same losses, checkpoints that reshard across pp, exports -------------
def test_pp2_x_tp2_logs_the_single_process_losses(runs):
    # LoRA under pipeline stages is in the parity suite (tests/parallel/test_parity.py).
    assert_same_losses(losses(runs.pp2_tp2("full")), losses(runs.reference4("full")))


@pytest.mark.parametrize("nproc, layout", [(4, ["parallel.pp=4"]), (0, [])], ids=["pp4", "one-process"])
def test_checkpoint_of_pp2_x_tp2_resumes_at_pp4_and_in_one_process(runs, tmp_path, nproc, layout):
    checkpoint = os.path.join(runs.pp2_tp2("full"), "checkpoints", f"step_{SAVE_AT:08d}")
    run_dir = tmp_path / "resumed"
    result = launch(nproc, *TINY, *LAYERS4, f"data.train={runs.train_file}", f"train.output_dir={run_dir}",
                    f"train.resume={checkpoint}", *layout)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(runs.reference4("full"))
    assert_same_losses(losses(run_dir), {s: expected[s] for s in range(SAVE_AT + 1, STEPS + 1)})


def test_export_of_pp2_x_tp2_loads_in_sentence_transformers_with_the_engines_embeddings(runs):
    """Every stage's weights reach the export: the same tensors as one process's export, and
    sentence-transformers embeds with them as the engine's own API does."""
    from sentence_transformers import SentenceTransformer

    from engine import Embedder

    export = runs.pp2_tp2("full") + "-export"
    expected = read_safetensors(runs.reference4("full") + "-export")
    got = read_safetensors(export)
    assert sorted(got) == sorted(expected) and any("layers.3." in name for name in got)  # the last stage's
    for name, want in expected.items():
        assert float((got[name] - want).norm() / want.norm()) <= 1e-4, name
    texts = ["what color is item 3?", "item 3 is red", "item 7 is blue"]
    st = SentenceTransformer(export, device="cpu").encode(texts, batch_size=2)
    engine = Embedder.from_pretrained(export).encode(texts, batch_size=2)
    assert float(abs(st - engine).max()) <= 1e-5


# ---- export gathers the shards -----------------------------------------------------------
@pytest.mark.parametrize("tune", ["full", "lora"])
def test_export_of_tp2_x_dp2_holds_the_single_process_weights(runs, tune):
    expected = read_safetensors(runs.reference(tune) + "-export")
    got = read_safetensors(runs.tp2_dp2(tune) + "-export")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        # Near-zero gradients (see LR) leave a few elements apart by part of an lr step, and the
        # next steps' gradients shift slightly everywhere. Measured after 5 steps at tp 2 x dp 2:
        # per tensor at most 0.05% of elements outside rtol 1e-4 / atol 1e-6, a relative error of
        # at most 1e-5, no element off by more than 3.4e-5. A shard gathered wrongly (missing,
        # misplaced, duplicated) is off by the weights' own size (~0.02) over whole rows or
        # blocks: one wrong row of 512 alone is a relative error of ~0.06.
        close = torch.isclose(have, want, rtol=1e-4, atol=1e-6).float().mean().item()
        assert close >= 0.99, (name, close)
        assert float((have - want).norm() / want.norm()) <= 1e-4, name
        assert float((have - want).abs().max()) <= LR * STEPS, name  # at most ~one lr per AdamW step


@pytest.mark.parametrize("tied, layout", [(True, ["parallel.tp=2"]), (False, ["parallel.pp=2"])],
                         ids=["tp2", "pp2-untied"])
def test_export_of_a_model_folder_holds_the_single_process_weights(tmp_path, train_file, tied, layout):
    """From model.path each rank reads only its slices, and the export is rebuilt on rank 0 from
    a meta model filled with the gathered tensors; it must hold one process's weights. At pp 2 an
    untied LM head, which an embedding task never reads, is on no stage: the export takes it from
    the model folder (Trainer._untouched)."""
    from engine.config import ModelConfig
    from engine.data.byte_tokenizer import byte_tokenizer
    from engine.model.args import ModelArgs
    from engine.model.hf_io import save_pretrained
    from engine.model.transformer import Transformer

    folder = str(tmp_path / "model")
    torch.manual_seed(5)
    save_pretrained(Transformer(ModelArgs.from_model_config(ModelConfig(tie_word_embeddings=tied))), folder)
    byte_tokenizer().save_pretrained(folder)
    exports = {}
    for name, nproc, layout in (("single", 0, []), ("parallel", 2, layout)):
        run_dir = tmp_path / name
        result = launch(nproc, *TINY, f"data.train={train_file}", f"model.path={folder}", "lora.rank=4",
                        f"train.output_dir={run_dir}", f"export.output_dir={run_dir}-export", *layout)
        assert result.returncode == 0, result.stderr[-3000:]
        exports[name] = read_safetensors(f"{run_dir}-export")
    assert sorted(exports["parallel"]) == sorted(exports["single"])
    for name, want in exports["single"].items():
        have = exports["parallel"][name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        assert float((have - want).norm() / want.norm()) <= 1e-5, name


# ---- invalid layouts: one line, before anything starts ------------------------------------
# (WORLD_SIZE, overrides, fragments the message must contain). Each case breaks only the rule named.
INVALID = {
    "world-size": ("3", ["parallel.tp=2"], ["= 2 does not divide the world size 3"]),
    "heads": ("4", ["parallel.tp=4", "model.num_heads=6", "model.hidden_size=96"],
              ["num_heads=6 is not divisible by parallel.tp=4"]),
    "kv-heads-multiple": ("6", ["parallel.tp=6", "model.num_heads=12", "model.num_kv_heads=4", "model.hidden_size=96",
                                "model.intermediate_size=192", "model.vocab_size=516"],
                          ["parallel.tp=6 must divide or be a multiple of num_kv_heads=4", "tp that works: 1, 2, 4, 12"]),
    "kv-heads-divide": ("4", ["parallel.tp=4", "model.num_heads=12", "model.num_kv_heads=6", "model.hidden_size=96"],
                        ["num_kv_heads=6 is not divisible by parallel.tp=4"]),
    "intermediate": ("2", ["parallel.tp=2", "model.intermediate_size=129"],
                     ["intermediate_size=129 is not divisible by parallel.tp=2"]),
    "vocab": ("2", ["parallel.tp=2", "model.vocab_size=513"], ["vocab_size=513 is not divisible by parallel.tp=2"]),
    "batch": ("2", ["train.batch_size=6", "train.grad_accum=2"],
              ["train.batch_size=6 is not divisible by data-parallel size 2 x train.grad_accum=2 = 4"]),
    "pp-layers": ("4", ["parallel.pp=4"], ["num_layers=2 is fewer than parallel.pp=4 pipeline chunks"]),
    "pp-virtual-layers": ("2", ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2"],
                          ["num_layers=2 is fewer than parallel.pp=2 x parallel.pp_virtual=2 pipeline chunks"]),
    "pp-schedule": ("2", ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"],
                    ["parallel.pp_schedule='zero_bubble': choose one of gpipe, 1f1b, interleaved"]),
    "pp-interleaved-one-chunk": ("2", ["parallel.pp=2", "parallel.pp_schedule=interleaved"],
                                 ["parallel.pp_schedule=interleaved needs parallel.pp_virtual >= 2"]),
    "pp-virtual-schedule": ("2", ["parallel.pp=2", "parallel.pp_virtual=2"],
                            ["parallel.pp_virtual=2 needs parallel.pp_schedule=interleaved"]),
    "pp-tied-yes-no": ("2", ["parallel.pp=2", "task=reranker"],
                       ["parallel.pp=2 with task.head=yes_no on a model with tied embeddings"]),
    "ulysses-heads": ("4", ["parallel.ulysses=4", "model.num_heads=6", "model.hidden_size=96"],
                      ["parallel.ulysses=4: num_heads=6 query heads do not split over 4 ranks",
                       "ulysses that works: 1, 2, 3, 6", "use parallel.ring=4 instead"]),
    "ulysses-kv-heads": ("4", ["parallel.ulysses=4", "model.num_heads=12", "model.num_kv_heads=6",
                               "model.hidden_size=96"],
                         ["6 KV heads per tp rank neither split over nor repeat evenly to 4 ranks"]),
    "lora-target": ("2", ["parallel.tp=2", "lora.rank=4", "lora.targets=[self_attn.q_proj,lm_head]"],
                    ["LoRA adapts only the block projections", "not lm_head"]),
}


# Two cases as a user meets them, in a fresh interpreter; the rest through the same entry point in
# this process (tests/conftest.py InProcess), which saves an interpreter's imports per case.
IN_A_FRESH_PROCESS = ("world-size", "lora-target")


def _assert_one_line_before_training(result, run_dir, fragments) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("[rank 0] config error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(run_dir)  # nothing was built or written
    assert result.stdout == ""


@pytest.mark.parametrize("case", IN_A_FRESH_PROCESS)
def test_invalid_layout_is_one_line_before_training(tmp_path, train_file, case):
    world_size, overrides, fragments = INVALID[case]
    run_dir = tmp_path / "run"
    # The launcher validates from WORLD_SIZE before creating any process group: no torchrun needed.
    result = launch(0, *TINY, f"data.train={train_file}", f"train.output_dir={run_dir}", *overrides,
                    env=_env(WORLD_SIZE=world_size, RANK="0"))
    _assert_one_line_before_training(result, run_dir, fragments)


@pytest.mark.parametrize("case", [case for case in INVALID if case not in IN_A_FRESH_PROCESS])
def test_invalid_layout_is_one_line_before_training_in_process(tmp_path, train_file, train_here, monkeypatch, case):
    import engine.cli

    world_size, overrides, fragments = INVALID[case]
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    # A rank of several leaves with os._exit (engine/cli.py _exit); here the exit code is enough.
    monkeypatch.setattr(engine.cli, "_exit", sys.exit)
    result = train_here(*TINY, f"data.train={train_file}", f"train.output_dir={run_dir}", *overrides)
    _assert_one_line_before_training(result, run_dir, fragments)


def test_user_error_under_torchrun_is_reported_by_every_rank(tmp_path):
    missing = tmp_path / "missing.jsonl"
    # torchrun stops the other ranks once one fails; polling every 3 s lets both finish their line.
    result = launch(2, *TINY, f"data.train={missing}", f"train.output_dir={tmp_path / 'run'}",
                    torchrun_args=("--monitor-interval=3",))
    assert result.returncode != 0
    # torchrun adds its own failure report; the ranks' lines are the ones naming the file.
    lines = sorted(line for line in result.stderr.splitlines() if f"data.train={missing}" in line)
    assert lines == [f"[rank {r}] config error: data.train={missing}: no such file" for r in (0, 1)], result.stderr
