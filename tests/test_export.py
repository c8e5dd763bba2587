"""Exports load in the tools users have, and score exactly like the engine."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import Embedder, Reranker
from engine.export import PARITY_FILE, export_checkpoint
from engine.train.checkpoint import latest_checkpoint
from tests.train.test_trainer import make_trainer

QUERIES = ["what color is item 3?", "what color is item 11?"]
DOCS = ["item 3 is green", "item 11 is gold", "item 7 is a rather long description of a purple thing"]


def trained_checkpoint(tmp_path, tiny_data, *overrides):
    trainer = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=2", "train.eval_every=0", *overrides)
    trainer.train()
    return trainer, latest_checkpoint(str(tmp_path / "run"))


def engine_embeddings(trainer, texts, is_query):
    from engine.inference import encode_tokens

    enc = trainer.text_encoder
    tokens = enc.queries(texts, [None] * len(texts)) if is_query else enc.documents(texts)
    return encode_tokens(trainer.model, tokens, 8, torch.device("cpu")).numpy()


def cosine(a, b):
    return F.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)


def parity_checked(folder) -> set[str]:
    """What the export's own parity check loaded its folder with (engine/export_parity.py)."""
    with open(os.path.join(folder, PARITY_FILE)) as f:
        report = json.load(f)
    assert report["passed"]
    return {c["served"] for c in report["comparisons"] if c["against"] == "engine"}


@pytest.mark.parametrize("overrides", [
    ["task.pooling=last", "lora.rank=4"],
    ["task.pooling=mean", "task.normalize=false"],
    ["task.pooling=cls", "lora.rank=4"],
])
def test_sentence_transformers_gives_the_engine_embeddings(tmp_path, tiny_data, overrides):
    from sentence_transformers import SentenceTransformer

    # One length for both: sentence-transformers truncates every text at max_seq_length.
    trainer, checkpoint = trained_checkpoint(tmp_path, tiny_data, "task=embedding", "data.doc_max_len=64", *overrides)
    out = export_checkpoint(checkpoint, str(tmp_path / "export"))
    assert parity_checked(out) == {"sentence-transformers", "transformers AutoModel"}
    st = SentenceTransformer(out, device="cpu")
    query_tokens = trainer.text_encoder.queries(QUERIES, [None] * len(QUERIES))
    assert query_tokens[0] != query_tokens[1]  # the queries' own words survive truncation
    for texts, is_query in ((DOCS, False), (QUERIES, True)):
        expected = engine_embeddings(trainer, texts, is_query)
        kwargs = {"prompt_name": "query"} if is_query else {}
        got = st.encode(texts, batch_size=2, **kwargs)
        assert cosine(got, expected).min() >= 0.99999
        api = Embedder.from_pretrained(out).encode(texts, batch_size=2, is_query=is_query)
        np.testing.assert_allclose(api, expected, rtol=1e-5, atol=1e-5)


def test_yes_no_reranker_export_is_a_causal_lm_that_scores_the_same(tmp_path, tiny_data):
    from transformers import AutoModelForCausalLM

    trainer, checkpoint = trained_checkpoint(tmp_path, tiny_data, "task=reranker", "lora.rank=4")
    out = export_checkpoint(checkpoint, str(tmp_path / "export"))
    assert parity_checked(out) == {"transformers *ModelForCausalLM"}
    reranker = Reranker.from_pretrained(out)
    scores = reranker.score(QUERIES[0], DOCS)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    yes, no = trainer.model.yes_no_ids
    for doc, score in zip(DOCS, scores):
        ids = trainer.text_encoder.pairs([QUERIES[0]], [doc], [None])[0]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        assert abs(float(logits[yes] - logits[no]) - score) < 1e-4
    # ... and the engine's own (unmerged LoRA) model agrees with the export.
    from engine.inference import encode_tokens

    tokens = trainer.text_encoder.pairs([QUERIES[0]] * len(DOCS), DOCS, [None] * len(DOCS))
    torch.testing.assert_close(encode_tokens(trainer.model, tokens, 8, torch.device("cpu")),
                               torch.tensor(scores), rtol=1e-4, atol=1e-4)


def test_linear_reranker_export_is_a_sequence_classifier(tmp_path, tiny_data):
    from transformers import AutoModelForSequenceClassification

    trainer, checkpoint = trained_checkpoint(tmp_path, tiny_data, "task=reranker", "task.head=linear")
    out = export_checkpoint(checkpoint, str(tmp_path / "export"))
    assert parity_checked(out) == {"transformers *ModelForSequenceClassification"}
    scores = Reranker.from_pretrained(out).score(QUERIES[1], DOCS)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    for doc, score in zip(DOCS, scores):
        ids = trainer.text_encoder.pairs([QUERIES[1]], [doc], [None])[0]
        with torch.no_grad():
            logit = hf(torch.tensor([ids])).logits[0, 0]
        assert abs(float(logit) - score) < 1e-4


def test_unmerged_export_is_a_peft_adapter(tmp_path, tiny_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    # A saved random base model, so the adapter has a base folder to point at.
    trainer0 = make_trainer(tmp_path / "r0", tiny_data, "train.max_steps=0")
    from engine.model.hf_io import save_pretrained

    save_pretrained(trainer0.model.backbone, str(base_dir))
    trainer0.tokenizer.save_pretrained(str(base_dir))
    trainer, checkpoint = trained_checkpoint(tmp_path, tiny_data, "task=reranker", "lora.rank=4",
                                             f"model.path={base_dir}")
    out = export_checkpoint(checkpoint, str(tmp_path / "adapter"), merge_lora=False)
    with open(os.path.join(out, PARITY_FILE)) as f:
        assert {c["served"] for c in json.load(f)["comparisons"]} == {"peft (base + adapter)"}
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), out).eval()
    ids = torch.tensor([trainer.text_encoder.pairs([QUERIES[0]], [DOCS[0]], [None])[0]])
    with torch.no_grad():
        expected = trainer.model.backbone.logits(trainer.model.backbone(ids[0]))[-1]
        got = hf(ids).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
