"""Cross-encoder: (query + document) sequences -> one score each -> a loss over each group.

Two score heads:
- yes_no: logit(yes) - logit(no) at the last position (Qwen3-Reranker), computed from the two
  rows of the LM head only, never the full vocabulary;
- linear: a bias-free one-output layer on the last token (what transformers'
  *ForSequenceClassification models compute, so the export loads as one).
"""
from __future__ import annotations

from torch import Tensor, nn

from engine.config import reads_lm_head, task_loss
from engine.data.batch import PackedSequences, RerankerBatch
from engine.data.tokenize import yes_no_token_ids
from engine.losses import distill_kl, listwise_ce, pairwise_hinge, pointwise_bce, ranknet
from engine.tasks.base import TaskModule


class RerankerTask(TaskModule):
    def __init__(self, backbone: nn.Module, cfg, tokenizer=None, yes_no_ids: tuple[int, int] | None = None,
                 head_device=None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.dp_group = None  # set by engine.parallel.parallelize: evaluation splits batches over it
        # The yes/no head reads two rows of the LM head: a pipeline's last stage must hold it.
        self.reads_lm_head = reads_lm_head(cfg)
        if cfg.head == "yes_no":
            if yes_no_ids is None:
                yes_no_ids = yes_no_token_ids(tokenizer, cfg)
            self.yes_no_ids = yes_no_ids
        else:
            embed = backbone.model.embed_tokens.weight
            # Real even when the backbone waits on the meta device for its slices (parallel loading).
            device = head_device or embed.device
            self.score = nn.Linear(embed.shape[1], 1, bias=False, dtype=embed.dtype, device=device)

    pooling = "last"  # the score is read at each pair's last token

    def rows_from_pooled(self, last: Tensor) -> Tensor:
        # The head reads the last token where it lies: under context parallelism only that rank's
        # row is non-zero, so the head's gradient is counted once, and the scores are summed over ranks.
        if self.cfg.head == "yes_no":
            rows = self.backbone.lm_head_rows(list(self.yes_no_ids))  # (2, H)
            return self.backbone.reduce_shards((last @ (rows[0] - rows[1])).float())
        # A copy, not squeeze's view: under FSDP the rows leave encode_tower, and a view there is an
        # output whose in-place use would skip FSDP's pre-backward hook (torch warns). B floats.
        return self.backbone.reduce_shards(self.score(last).squeeze(-1).float().clone())

    def towers(self, batch: RerankerBatch) -> list[PackedSequences]:
        return [batch.pairs]

    def loss_from_outputs(self, outputs: list[Tensor], batch: RerankerBatch) -> Tensor:
        scores = outputs[0].view(-1, batch.group_size)  # (B, G), positive first
        loss = task_loss(self.cfg)
        if loss == "listwise":
            return listwise_ce(scores)
        if loss == "hinge":
            return pairwise_hinge(scores, self.cfg.hinge_margin)
        labels = batch.labels if batch.labels is not None else _positive_first_labels(scores)
        if loss == "ranknet":
            return ranknet(scores, labels)
        if loss == "bce":
            return pointwise_bce(scores, labels.to(scores.dtype))
        if batch.teacher_scores is None:
            raise ValueError("task.loss=distill needs teacher scores (pos_scores/neg_scores) on every training line")
        return distill_kl(scores, batch.teacher_scores.to(scores.dtype), temperature=self.cfg.distill_temperature)


def _positive_first_labels(scores: Tensor) -> Tensor:
    labels = scores.new_zeros(scores.shape)
    labels[:, 0] = 1
    return labels

