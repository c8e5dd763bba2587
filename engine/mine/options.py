"""The mining options: sentence-transformers' `mine_hard_negatives` arguments under the same names,
plus what Ember adds (output, corpus file, reranker). launch/mine.py reads them as `mine.KEY=VALUE`.

Every rule that ties two options together lives in `check`, whose failures are one line naming the
keys, and `range_max` left unset is derived exactly as sentence-transformers derives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.config import ConfigError

SAMPLING_STRATEGIES = ("top", "random")
# Every format is FlagEmbedding JSONL. lines: one line per input line with the negatives found
# (sentence-transformers' labeled-list keeps rows with some, triplet each one); n-tuple: only the
# lines that found num_negatives (its n-tuple); triplet: one line per (query, positive, negative).
OUTPUT_FORMATS = ("lines", "n-tuple", "triplet")


@dataclass
class MineOptions:
    output: Optional[str] = None  # the mined JSONL file (required); its summary goes beside it (.summary.txt)
    # --- sentence-transformers' mine_hard_negatives, same names and meaning ---
    range_min: int = 0  # skip this many of the best-scoring surviving candidates
    range_max: Optional[int] = None  # candidates considered per query; null = derived as sentence-transformers does
    max_score: Optional[float] = None  # drop candidates scoring above this
    min_score: Optional[float] = None  # drop candidates scoring below this
    absolute_margin: Optional[float] = None  # drop candidates with score + margin > the query's lowest positive score
    relative_margin: Optional[float] = None  # drop candidates above positive - |positive| * margin
    num_negatives: int = 3
    sampling_strategy: str = "top"  # top | random (seeded by mine.seed)
    output_format: str = "lines"  # lines | n-tuple | triplet (see OUTPUT_FORMATS)
    output_scores: bool = False  # write the embedder's cosine scores as pos_scores / neg_scores
    batch_size: int = 32  # texts per forward pass
    faiss_batch_size: int = 16384  # queries per search call (faiss or exact), bounding the score matrix
    use_faiss: Optional[bool] = None  # null = faiss when installed, exact search otherwise
    cache_folder: Optional[str] = None  # keep the embeddings here (.npy) and reuse them on the next run
    # --- Ember's additions ---
    seed: int = 42  # the random strategy's sampler (Python's random.Random(seed))
    corpus: Optional[str] = None  # extra candidate texts: a JSONL file of {"text", "_id"?} lines
    corpus_from_negatives: bool = False  # the input file's own negatives join the candidates too
    reranker: Optional[str] = None  # an Ember reranker folder: drop candidates it scores above the positive
    reranker_margin: float = 0.0  # ... above the positive minus this margin
    reranker_batch_size: int = 16  # (query, text) pairs per reranker forward pass


def check(o: MineOptions) -> None:
    """The rules sentence-transformers raises on, and Ember's own, each as one line naming the key."""
    if not o.output:
        raise ConfigError("mine.output is required: the JSONL file to write (mine.output=PATH)")
    if o.sampling_strategy not in SAMPLING_STRATEGIES:
        raise ConfigError(
            f"mine.sampling_strategy={o.sampling_strategy!r} is not one of {', '.join(SAMPLING_STRATEGIES)}")
    if o.output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"mine.output_format={o.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if o.num_negatives < 1:
        raise ConfigError(f"mine.num_negatives={o.num_negatives} must be at least 1")
    if o.range_min < 0:
        raise ConfigError(f"mine.range_min={o.range_min} must be >= 0")
    for key in ("batch_size", "faiss_batch_size", "reranker_batch_size"):
        if getattr(o, key) < 1:
            raise ConfigError(f"mine.{key}={getattr(o, key)} must be >= 1")
    if o.reranker_margin < 0:
        raise ConfigError(f"mine.reranker_margin={o.reranker_margin} must be >= 0")
    if o.range_max is not None:
        _check_window(o, o.range_max)


def _check_window(o: MineOptions, range_max: int) -> None:
    if o.range_min >= range_max:
        raise ConfigError(f"mine.range_min={o.range_min} must be smaller than mine.range_max={range_max}")
    if o.num_negatives > range_max - o.range_min:
        raise ConfigError(
            f"mine.num_negatives={o.num_negatives} does not fit: only {range_max - o.range_min} candidates remain "
            f"after skipping mine.range_min={o.range_min} of mine.range_max={range_max}"
        )


def resolved_range_max(o: MineOptions, max_positives: int) -> int:
    """range_max as given, or sentence-transformers' default: room for the positives and num_negatives
    after range_min, ten times num_negatives where a filter will drop candidates. The reranker drops
    candidates too, so it widens the window as well (sentence-transformers widens it for a cross_encoder
    with min_score)."""
    range_max = o.range_max
    if range_max is None:
        filters = (o.absolute_margin, o.relative_margin, o.max_score)
        if any(f is not None for f in filters) or o.reranker:
            range_max = o.range_min + o.num_negatives * 10 + max_positives
        else:
            range_max = o.range_min + o.num_negatives + max_positives
    _check_window(o, range_max)
    return range_max
