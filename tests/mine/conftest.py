"""Tiny exported models and a synthetic file to mine: what every mining test starts from."""
from __future__ import annotations

import random
import string

import pytest
import torch

from tests.conftest import write_jsonl

TINY = ["train.tensorboard=false", "task.query_instruction=find the item", "task.instruction=find the item",
        "data.query_max_len=64", "data.doc_max_len=64", "data.max_len=320"]


def export_tiny(folder, *overrides: str, seed: int = 0) -> str:
    """A random tiny model exported as Ember exports a trained one (no training: mining only needs
    some fixed weights). Both sequence lengths alike: sentence-transformers truncates at one."""
    from engine.build import build_task_model, load_tokenizer
    from engine.cli import compose
    from engine.export import export_task

    cfg, _ = compose([*TINY, f"train.seed={seed}", *overrides])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(seed)
    task = build_task_model(cfg, torch.device("cpu"), tokenizer)
    return export_task(task, cfg, tokenizer, str(folder))


def mining_lines(n: int = 40, seed: int = 0) -> list[dict]:
    """FlagEmbedding lines with what mining must handle: several positives on some lines, a query
    asked on two lines, a query whose text is also a corpus text, ids on every document. Texts are
    made of random made-up words: a random model's embeddings then spread (the same sentence with
    one word changed would all embed alike, and every query would get the same negatives)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))) for _ in range(60)]
    lines = []
    for k in range(n):
        pos = [" ".join(rng.sample(words, rng.randint(3, 6)))]
        if k % 7 == 3:
            pos.append(" ".join(rng.sample(words, 4)))
        query = " ".join(rng.sample(pos[0].split(), 2) + rng.sample(words, 1))
        lines.append({"query": query, "pos": pos, "neg": [" ".join(rng.sample(words, 3))],
                      "query_id": f"q{k}", "pos_ids": [f"d{k}-{j}" for j in range(len(pos))], "neg_ids": [f"n{k}"]})
    lines.append({"query": lines[0]["query"], "pos": [" ".join(rng.sample(words, 5))], "query_id": "q0b"})
    lines.append({"query": lines[5]["pos"][0], "pos": [" ".join(rng.sample(words, 4))]})
    return lines


@pytest.fixture(scope="session")
def embedder_export(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("embedder") / "export", "task=embedding", "task.pooling=last")


@pytest.fixture(scope="session")
def reranker_export(tmp_path_factory):
    # The plain template: the byte tokenizer makes qwen3's chat prefix some 175 tokens per pair.
    return export_tiny(tmp_path_factory.mktemp("reranker") / "export", "task=reranker", "task.template=plain", seed=1)


@pytest.fixture
def mining_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", mining_lines())
