"""One pp rank's part of a task: the layers its chunk holds, and the forward it runs.

keep_stage() drops, in place, what the rank's chunk does not hold (stages.py decides): the other
decoder layers become NotOnThisStage placeholders, so the held ones keep their global names
(`model.layers.37...` on whichever stage holds layer 37) and checkpoints, sliced loading and export
see the single-process names; the embedding stays on the first stage only, the final norm and the
head on the last (the LM head only where the task reads it: a reranker's yes/no rows).

PipelineStage.forward(chunk, seqs, received) is what a schedule (engine/train/pipeline.py) calls per
micro-batch: the task's encode_stage (engine/tasks/base.py), where every stage lays out the same
packed stream from the batch (cheap index arithmetic), so only hidden states travel between
stages; the first stage embeds, each runs its layers, and the last finishes (final norm, pooling)
and applies the task's head, returning one row per sequence.
"""
from __future__ import annotations

from torch import Tensor, nn

from engine.data.batch import PackedSequences
from engine.parallel.pipeline.stages import Chunk, StagePlan, plan_stages


class StageLayoutError(ValueError):
    """A model and task this version cannot split into pipeline stages."""


class NotOnThisStage(nn.Module):
    """Stands in for a decoder layer another pipeline stage holds: no parameters, never run."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} is held by another pipeline stage")


def plan_for(task: nn.Module, pp: int, virtual: int = 1) -> StagePlan:
    """The stage rule for this task's backbone (the LM head counted on the last stage when read)."""
    return plan_stages(task.backbone.args, pp, virtual, head_rows=task.reads_lm_head)


def keep_stage(task: nn.Module, chunks: list[Chunk]) -> None:
    """Keep only what this rank's `chunks` (its virtual stages) hold of task.backbone (in place)."""
    backbone, reads_lm_head = task.backbone, task.reads_lm_head
    held = {layer for chunk in chunks for layer in chunk.layers}
    embedding, head = any(c.embedding for c in chunks), any(c.head for c in chunks)
    if backbone.args.tie_word_embeddings and reads_lm_head and head and not embedding:
        # The last stage would hold a second copy of the embedding whose gradient must be summed with
        # the first stage's every step (Megatron's embedding group); not built yet.
        raise StageLayoutError(
            "a tied LM head read by the task (task.head=yes_no) on a pipeline stage other than the embedding's "
            "is not supported yet: use task.head=linear, an untied model, or parallel.pp=1"
        )
    layers = backbone.model.layers
    for index in range(len(layers)):
        if index not in held:
            layers[index] = NotOnThisStage(index)
    if not embedding:
        backbone.model.embed_tokens = None
    if not head:
        backbone.model.norm = None
    if not (head and reads_lm_head):
        backbone.lm_head = None
    if not head:  # the task's own modules (a reranker's linear score) are its head: the last stage's
        for name, _ in list(task.named_children()):
            if name != "backbone":
                setattr(task, name, None)
    backbone.tie_weights()


class PipelineStage:
    """This rank's chunks (virtual stages) of a task, run one micro-batch at a time by a pipeline
    schedule."""

    def __init__(self, task: nn.Module, plan: StagePlan, pp_rank: int):
        self.task, self.rank, self.size, self.virtual = task, pp_rank, plan.pp, plan.virtual
        self.chunks = {c.index: c for c in plan.chunks_of(pp_rank)}
        layers = task.backbone.model.layers
        self.layers = {c.index: [layers[i] for i in c.layers] for c in self.chunks.values()}

    def chunk(self, index: int) -> Chunk:
        return self.chunks[index]

    @property
    def is_first(self) -> bool:
        """Holds the first chunk (the embedding)."""
        return any(c.embedding for c in self.chunks.values())

    @property
    def is_last(self) -> bool:
        """Holds the last chunk (the head): the rows come out here."""
        return any(c.head for c in self.chunks.values())

    def hidden_shape(self, seqs: PackedSequences) -> tuple[int, ...]:
        """The shape of the hidden states between chunks for this micro-batch: what p2p buffers are
        sized by, the same on every stage since every stage lays out the same stream."""
        return self.task.hidden_shape(seqs)

    def forward(self, index: int, seqs: PackedSequences, received: Tensor | None) -> Tensor:
        """Chunk `index` on one micro-batch. received: the previous chunk's hidden states (None on the
        first). Returns the chunk's hidden states, or on the last chunk the task's rows (one per sequence)."""
        chunk = self.chunks[index]
        return self.task.encode_stage(seqs, received, self.layers[index], chunk.embedding, chunk.head)
