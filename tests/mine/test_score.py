"""launch/score.py: the reranker's scores of every line's positives and negatives, written back into
the lines as pos_scores / neg_scores, which distillation then trains on."""
from __future__ import annotations

import json
import math

import pytest

from engine import Reranker
from tests.conftest import InProcess, read_metrics, write_jsonl
from tests.mine.conftest import mining_lines


def lines_to_score() -> list[dict]:
    """FlagEmbedding lines with negatives (one with its own instruction), and an ms-swift line."""
    lines = [line for line in mining_lines(12) if line.get("neg")]
    lines[2]["prompt"] = "judge the words"
    lines.append({"query": "ab cd", "response": "cd ef ab", "rejected_response": ["gh ij", "kl mn"], "extra": 1})
    return lines


@pytest.fixture
def scored(tmp_path, capsys, monkeypatch, reranker_export):
    lines = lines_to_score()
    source = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "scored.jsonl"
    run = InProcess(capsys, monkeypatch, "score.py")(f"model.path={reranker_export}", f"data.train={source}",
                                                      "--output", str(out), "score.batch_size=5")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["lines"] == len(lines)
    return lines, [json.loads(line) for line in open(out)], str(out)


def test_scores_are_the_rerankers(scored, reranker_export):
    lines, records, _ = scored
    reranker = Reranker.from_pretrained(reranker_export)
    assert len(records) == len(lines)
    for line, record in zip(lines, records):
        # Every key of the line is kept as it was; the two score lists are added.
        assert {k: v for k, v in record.items() if not k.endswith("_scores")} == line
        positives = line.get("pos") or [line["response"]]
        negatives = line.get("neg") or line["rejected_response"]
        expected = reranker.score(line["query"], positives + negatives, instruction=line.get("prompt"))
        got = record["pos_scores"] + record["neg_scores"]
        assert len(record["pos_scores"]) == len(positives) and len(record["neg_scores"]) == len(negatives)
        # Pairs are batched differently here and there: float32 rounding apart.
        assert got == pytest.approx(expected, abs=1e-5)


def embedding_distill_available() -> bool:
    from engine import config

    return "distill" in getattr(config, "TASK_LOSSES", {}).get("embedding", ())


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_distillation_trains_on_the_scored_file(scored, tmp_path, task):
    if task == "embedding" and not embedding_distill_available():
        pytest.skip("task.loss=distill for embeddings is not in this tree yet")
    from engine.cli import compose
    from engine.config import validate
    from engine.train.trainer import Trainer

    _, _, path = scored
    run_dir = tmp_path / f"distill_{task}"
    cfg, yaml = compose([f"task={task}", "task.loss=distill", f"data.train={path}", "data.eval=null",
                         f"train.output_dir={run_dir}", "train.max_steps=2", "train.batch_size=4",
                         "task.num_negatives=1", "train.tensorboard=false", "task.query_instruction=find the item",
                         "task.template=plain", "data.query_max_len=64", "data.doc_max_len=64", "data.max_len=160"])
    validate(cfg)
    Trainer(cfg, yaml).train()
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
