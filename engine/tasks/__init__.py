"""Tasks turn a batch into scores and a loss: embedding (bi-encoder) and reranker (cross-encoder)."""
from engine.tasks.embedding import EmbeddingTask
from engine.tasks.reranker import RerankerTask

__all__ = ["EmbeddingTask", "RerankerTask", "build_task"]


def build_task(backbone, task_cfg, tokenizer=None, head_device=None):
    if task_cfg.type == "embedding":
        return EmbeddingTask(backbone, task_cfg)
    return RerankerTask(backbone, task_cfg, tokenizer, head_device=head_device)
