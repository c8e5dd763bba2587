"""Pipeline stages and schedules on real gloo processes against one process.

1. Reference: one process, the whole model, the whole global batch in one graph (loss.backward()).
2. The same model (same seed) cut into pp stages (keep_stage), the same batch through each pipeline
   schedule (gpipe, 1f1b, interleaved with 2 virtual stages per rank): the GradCache pipeline for embeddings (InfoNCE over the whole batch, chunks as
   micro-batches), the plain schedule for a reranker (micro-batches of whole query groups).
3. Every stage's loss equals the reference's, and every parameter a stage holds has the reference's
   gradient. The GradCache pipeline is also run with chunks of one and of several sequences, and the
   loss a micro-batch-limited pool would give is shown to differ (the test would catch it).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine.config import TaskConfig
from engine.data.batch import EmbeddingBatch, PackedSequences, RerankerBatch
from engine.model.args import ModelArgs
from engine.model.lora import apply_lora
from engine.model.transformer import Transformer
from engine.parallel.pipeline.stage import PipelineStage, StageLayoutError, keep_stage
from engine.parallel.pipeline.stages import plan_stages
from engine.parallel.spawn import spawn_ranks
from engine.tasks import EmbeddingTask, RerankerTask
from engine.train.pipeline import PipelineSchedule, grad_cache_pipeline_step, plain_pipeline_step

ARGS = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
            num_kv_heads=2)
QUERIES, GROUP = 3, 3  # 3 queries, each with a positive and 2 hard negatives


def build(case: dict):
    torch.manual_seed(0)
    backbone = Transformer(ModelArgs(**ARGS, tie_word_embeddings=case["tied"]))
    if case["lora"]:
        apply_lora(backbone, rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    cfg = TaskConfig(type=case["task"], pooling=case.get("pooling", "last"), head=case.get("head", "linear"),
                     temperature=0.1, query_query=case.get("qq", False), doc_doc=case.get("qq", False))
    if case["task"] == "embedding":
        return EmbeddingTask(backbone, cfg)
    return RerankerTask(backbone, cfg, yes_no_ids=(10, 20))  # two ids of the tiny vocabulary


def token_lists(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def batch_for(case: dict):
    if case["task"] == "embedding":
        return EmbeddingBatch(queries=PackedSequences.from_token_lists(token_lists(QUERIES, 1)),
                              docs=PackedSequences.from_token_lists(token_lists(QUERIES * GROUP, 2)),
                              group_size=GROUP)
    return RerankerBatch(pairs=PackedSequences.from_token_lists(token_lists(QUERIES * GROUP, 3)), group_size=GROUP)


def reference(case: dict) -> dict:
    task = build(case)
    batch = batch_for(case)
    loss = task(batch)
    loss.backward()
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    return {"loss": float(loss.detach()), "grads": {n: p.grad for n, p in trainable if p.grad is not None},
            "unused": {n for n, p in trainable if p.grad is None}}


def _stage_worker(rank: int, world: int, case: dict, kind: str, virtual: int) -> dict:
    task = build(case)
    plan = plan_stages(task.backbone.args, world, virtual, head_rows=task.reads_lm_head)
    keep_stage(task, plan.chunks_of(rank))
    schedule = PipelineSchedule(PipelineStage(task, plan, rank), kind, dist.group.WORLD, torch.float32,
                                torch.device("cpu"))
    batch = batch_for(case)
    if case["task"] == "embedding":
        towers = [seqs.chunks(case["chunk"]) for seqs in task.towers(batch)]
        loss = grad_cache_pipeline_step(schedule, towers, lambda outputs: task.loss_from_outputs(outputs, batch))
    else:  # micro-batches of whole query groups, each with its own loss
        groups = case["groups_per_micro"]
        micro = batch.pairs.chunks(groups * GROUP)
        loss_fns = [
            (lambda rows, i=i: task.loss_from_outputs(
                [rows], RerankerBatch(pairs=micro[i], group_size=GROUP)))
            for i in range(len(micro))
        ]
        loss = plain_pipeline_step(schedule, micro, loss_fns)
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    return {"loss": loss, "layers": plan.layers_of(rank),
            "grads": {n: p.grad.tolist() for n, p in trainable if p.grad is not None},
            "unused": [n for n, p in trainable if p.grad is None]}


CASES = {
    "embedding-lora-mean": dict(task="embedding", lora=True, tied=True, pooling="mean", chunk=2),
    "embedding-full-last-qq-dd": dict(task="embedding", lora=False, tied=False, pooling="last", qq=True, chunk=4),
    "embedding-lora-one-seq-chunks": dict(task="embedding", lora=True, tied=False, pooling="last", chunk=1),
    "reranker-yes-no": dict(task="reranker", lora=True, tied=False, head="yes_no", groups_per_micro=1),
    "reranker-linear-full": dict(task="reranker", lora=False, tied=True, head="linear", groups_per_micro=3),
}


# (case, pp, schedule, virtual stages per rank); 4 layers: pp 2 x 2 virtual is a layer per chunk.
JOBS = ([(name, 2, "1f1b", 1) for name in CASES] + [(name, 2, "interleaved", 2) for name in CASES]
        + [("embedding-lora-mean", 2, "gpipe", 1), ("reranker-linear-full", 2, "gpipe", 1),
           ("embedding-lora-mean", 4, "1f1b", 1), ("reranker-yes-no", 4, "1f1b", 1)])


@pytest.mark.parametrize("name, pp, kind, virtual", JOBS,
                         ids=[f"{name}-pp{pp}-{kind}" + (f"{v}" if v > 1 else "") for name, pp, kind, v in JOBS])
def test_pipeline_gives_the_single_process_loss_and_gradients(name, pp, kind, virtual):
    case = CASES[name]
    ref = reference(case)
    ranks = spawn_ranks(_stage_worker, pp, case, kind, virtual, timeout_s=90)
    # Chunks sum a parameter's gradient in another order than one graph: float32 noise, held to 1e-5
    # of the tensor's norm (or of the median tensor's, for tensors far smaller than the rest), as the
    # parity tests of the other layouts are (tests/parallel/test_parity.py).
    norms = sorted(float(g.norm()) for g in ref["grads"].values())
    scale = norms[len(norms) // 2]
    held = set()
    for r in ranks:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        assert set(r["unused"]) <= ref["unused"], name  # a parameter no loss reaches, as in one process
        for param, grad in r["grads"].items():
            want = ref["grads"][param]
            error = float((torch.tensor(grad) - want).norm()) / max(float(want.norm()), scale)
            assert error < 1e-5, (name, pp, param, error)
            held.add(param)
    # Between them the stages hold every parameter that gets a gradient, each exactly once.
    assert held == set(ref["grads"]) and sum(len(r["grads"]) for r in ranks) == len(ref["grads"])
    assert sorted(layer for r in ranks for layer in r["layers"]) == list(range(ARGS["num_layers"]))


def test_a_micro_batch_limited_pool_would_give_another_loss():
    """What a per-micro-batch InfoNCE would compute differs from the global batch's: the equality above
    is evidence that every query saw every candidate."""
    case = CASES["embedding-lora-mean"]
    task = build(case)
    batch = batch_for(case)
    whole = float(task(batch).detach())
    per_query = []
    for q in range(QUERIES):
        one = EmbeddingBatch(queries=batch.queries.select(q, q + 1),
                             docs=batch.docs.select(q * GROUP, (q + 1) * GROUP), group_size=GROUP)
        per_query.append(float(task(one).detach()))
    assert abs(sum(per_query) / QUERIES - whole) > 1e-3


def test_a_tied_yes_no_head_off_the_embedding_stage_is_refused():
    case = dict(task="reranker", lora=True, tied=True, head="yes_no")
    task = build(case)
    plan = plan_stages(task.backbone.args, 2, head_rows=True)
    with pytest.raises(StageLayoutError, match="tied LM head"):
        keep_stage(task, plan.chunks_of(1))
