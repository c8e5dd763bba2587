"""The data pipeline: JSONL -> Examples -> (sampler picks a step's examples) -> Collator ->
packed EmbeddingBatch / RerankerBatch. docs/data.md describes the formats and rules.

formats.py     load_examples, DataError: read and validate a whole JSONL file
templates.py   query/document/reranker templates (Qwen3-Reranker preset)
tokenize.py    TextEncoder: templated, truncated token ids (suffix and EOS never cut)
sampler.py     BatchSampler, choose_negatives: deterministic from (seed, step)
collate.py     Collator, embed_texts_batches, pair_batches: groups -> PackedSequences
byte_tokenizer.py  an offline byte-level tokenizer for tests and random-init models
"""
from engine.data.batch import EmbeddingBatch, PackedSequences, RerankerBatch
from engine.data.byte_tokenizer import byte_tokenizer
from engine.data.collate import Collator, embed_texts_batches, pair_batches
from engine.data.example import Example
from engine.data.formats import DataError, load_examples
from engine.data.sampler import BatchSampler, choose_negatives, choose_positive
from engine.data.templates import (
    RerankerTemplate,
    TemplateError,
    format_document,
    format_pair,
    format_query,
    reranker_template,
)
from engine.data.tokenize import TextEncoder

__all__ = [
    "BatchSampler",
    "Collator",
    "DataError",
    "EmbeddingBatch",
    "Example",
    "PackedSequences",
    "RerankerBatch",
    "RerankerTemplate",
    "TemplateError",
    "TextEncoder",
    "byte_tokenizer",
    "choose_negatives",
    "choose_positive",
    "embed_texts_batches",
    "format_document",
    "format_pair",
    "format_query",
    "load_examples",
    "pair_batches",
    "reranker_template",
]
