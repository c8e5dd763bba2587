"""Every export ends by loading itself as a server would and comparing with the engine
(engine/export_parity.py): a difference fails the export in one line and leaves the files aside."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import engine.export as export
from engine.build import build_task_model, load_tokenizer
from engine.cli import compose
from engine.export import FAILED_FILE, PARITY_FILE, UNSERVABLE_SUFFIX, export_task
from engine.export_parity import TOLERANCES, ExportParityError, _tolerance
from tests.test_export import DOCS, trained_checkpoint
from tests.train.test_trainer import TINY


def fresh_task(*overrides):
    """An untrained tiny model: the check needs no training to have something to compare. LoRA B
    starts at zero (a no-op adapter); it is made random so that a lost adapter shows."""
    cfg, _ = compose(TINY + list(overrides))
    tokenizer = load_tokenizer(cfg.model)
    task = build_task_model(cfg, torch.device("cpu"), tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in task.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    return task, cfg, tokenizer


def fresh_export(folder, *overrides):
    task, cfg, tokenizer = fresh_task(*overrides)
    return task, cfg, tokenizer, export_task(task, cfg, tokenizer, str(folder))


def report(folder) -> dict:
    with open(os.path.join(folder, PARITY_FILE)) as f:
        return json.load(f)


def served(folder) -> set[str]:
    return {c["served"] for c in report(folder)["comparisons"]}


def test_a_broken_pooling_config_fails_launch_export_in_one_line(tmp_path, tiny_data, train_here, monkeypatch):
    _, checkpoint = trained_checkpoint(tmp_path, tiny_data, "task=embedding", "task.pooling=last")
    out = tmp_path / "export"
    first = train_here(f"checkpoint={checkpoint}", f"output={out}", script="export.py")
    assert first.returncode == 0, first.stderr
    assert report(out)["passed"]

    write_st_files = export._write_sentence_transformers_files

    def mean_pooling_on_disk(cfg, hidden, folder):
        write_st_files(cfg, hidden, folder)
        path = os.path.join(folder, "1_Pooling", "config.json")
        with open(path) as f:
            pooling = json.load(f)
        pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
        with open(path, "w") as f:
            json.dump(pooling, f)

    monkeypatch.setattr(export, "_write_sentence_transformers_files", mean_pooling_on_disk)
    result = train_here(f"checkpoint={checkpoint}", f"output={out}", script="export.py")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export parity: sentence-transformers' query vectors differ from the engine's "
                               "(cosine "), lines[0]
    assert "check pooling (exported: mean)" in lines[0] and f"{out}{UNSERVABLE_SUFFIX}" in lines[0], lines[0]
    # The earlier, passing export is untouched; the failed one is kept aside, claiming nothing.
    assert report(out)["passed"]
    failed = f"{out}{UNSERVABLE_SUFFIX}"
    assert not os.path.exists(os.path.join(failed, PARITY_FILE))
    with open(os.path.join(failed, FAILED_FILE)) as f:
        assert f.read().startswith("export parity: sentence-transformers' query vectors")
    # Fixed, the next export replaces the folder and clears the failed one away.
    monkeypatch.undo()
    assert train_here(f"checkpoint={checkpoint}", f"output={out}", script="export.py").returncode == 0
    assert report(out)["passed"] and not os.path.exists(failed)


def test_the_end_of_training_export_fails_the_run_in_one_line(tmp_path, tiny_data, train_here, monkeypatch):
    write_task_file = export._write_task_file

    def yes_for_no(cfg, folder):
        write_task_file(cfg, folder)
        path = os.path.join(folder, export.TASK_FILE)
        with open(path) as f:
            info = json.load(f)
        info["task"].update(yes_token=cfg.task.no_token, no_token=cfg.task.yes_token)
        with open(path, "w") as f:
            json.dump(info, f)

    monkeypatch.setattr(export, "_write_task_file", yes_for_no)
    train, evaluation = tiny_data
    out = tmp_path / "export"
    result = train_here(*TINY, "task=reranker", "train.max_steps=1", "train.eval_every=0", f"data.train={train}",
                        f"data.eval={evaluation}", f"train.output_dir={tmp_path}/run", f"export.output_dir={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "export parity: the engine loaded from the export's scores differ from the trained model's"), result.stderr
    assert not out.exists() and (tmp_path / f"export{UNSERVABLE_SUFFIX}").is_dir()


def test_a_wrong_pooling_in_ember_task_is_caught_against_the_trained_model(tmp_path, monkeypatch):
    write_task_file = export._write_task_file

    def mean_in_task_file(cfg, folder):
        write_task_file(cfg, folder)
        path = os.path.join(folder, export.TASK_FILE)
        with open(path) as f:
            info = json.load(f)
        info["task"]["pooling"] = "mean"
        with open(path, "w") as f:
            json.dump(info, f)

    monkeypatch.setattr(export, "_write_task_file", mean_in_task_file)
    expected = (r"^export parity: the engine loaded from the export's query vectors differ from the trained "
                r"model's \(cosine .*trained with pooling last")
    with pytest.raises(ExportParityError, match=expected):
        fresh_export(tmp_path / "export", "task=embedding", "task.pooling=last")
    assert not (tmp_path / "export").exists() and (tmp_path / f"export{UNSERVABLE_SUFFIX}").is_dir()


def test_matryoshka_export_records_the_sizes_and_truncate_dim_gives_the_engine_prefixes(tmp_path):
    from sentence_transformers import SentenceTransformer

    task, cfg, tokenizer, out = fresh_export(tmp_path / "export", "task=embedding", "data.doc_max_len=64",
                                             "task.matryoshka_dims=[16,32]")
    with open(os.path.join(out, "config_sentence_transformers.json")) as f:
        assert json.load(f)["matryoshka_dims"] == [16, 32]
    with open(os.path.join(out, export.TASK_FILE)) as f:
        assert json.load(f)["task"]["matryoshka_dims"] == [16, 32]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["matryoshka_dimensions"] == [16, 32, 64]  # vLLM's key: the sizes `dimensions` takes
    checked = served(out)
    assert {"sentence-transformers (truncate_dim=16)", "sentence-transformers (truncate_dim=32)"} <= checked
    # ... and what the check claims, seen from outside it.
    from engine.data.tokenize import TextEncoder
    from engine.inference import encode_tokens

    full = encode_tokens(task, TextEncoder(tokenizer, cfg.task, cfg.data).documents(DOCS), 8, torch.device("cpu"))
    got = SentenceTransformer(out, device="cpu", truncate_dim=16).encode(DOCS, prompt_name="document",
                                                                         convert_to_tensor=True)
    assert got.shape == (len(DOCS), 16)
    assert F.cosine_similarity(got, full[:, :16], dim=-1).min() >= 0.99999


@pytest.mark.parametrize("overrides", [
    ["task=embedding", "task.pooling=mean", "task.normalize=false"],
    ["task=reranker", "task.head=linear"],
])
def test_low_precision_exports_pass_within_their_dtype_tolerance(tmp_path, overrides):
    _, _, _, out = fresh_export(tmp_path / "export", *overrides, "export.dtype=bfloat16")
    against_trained = [c for c in report(out)["comparisons"] if c["against"] == "trained model"]
    assert against_trained and report(out)["export_dtype"] == "bfloat16"
    assert _tolerance(torch.float32, "bfloat16") == TOLERANCES[torch.bfloat16]
    assert _tolerance(torch.bfloat16, "float32") == TOLERANCES[torch.bfloat16]


@pytest.mark.parametrize("overrides", [["task=embedding", "task.pooling=cls"], ["task=reranker", "task.head=linear"]])
def test_adapter_exports_are_checked_through_peft(tmp_path, overrides):
    from engine.model.hf_io import save_pretrained

    base_task, _, tokenizer = fresh_task("task=embedding")
    base = str(tmp_path / "base")
    save_pretrained(base_task.backbone, base)
    tokenizer.save_pretrained(base)
    _, _, _, out = fresh_export(tmp_path / "adapter", *overrides, "lora.rank=4", f"model.path={base}",
                                "export.merge_lora=false")
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    assert served(out) == {"peft (base + adapter)"}


def test_an_adapter_without_a_base_folder_is_not_servable(tmp_path):
    with pytest.raises(ExportParityError, match=r"no server can load base \+ adapter; export with export.merge_lora"):
        fresh_export(tmp_path / "adapter", "task=reranker", "lora.rank=4", "export.merge_lora=false")
    assert not (tmp_path / "adapter").exists()
