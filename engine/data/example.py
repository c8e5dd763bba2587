"""One training or evaluation example, whatever JSONL format it came from."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    pos_scores: list[float] | None = None  # teacher scores (FlagEmbedding), for distillation
    neg_scores: list[float] | None = None
    prompt: str | None = None  # per-example instruction (FlagEmbedding "prompt"); None = config default
    query_id: str | None = None  # ids when the data carries them (used in TREC run files)
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None
    line: int = 0  # 1-based line in the source file, for messages
    source: str = ""  # the file it came from, for messages

    @property
    def where(self) -> str:
        """PATH:LINE for messages."""
        return f"{self.source}:{self.line}" if self.source else f"line {self.line}"
