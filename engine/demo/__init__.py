"""The demo: fine-tune SmolLM2-135M-Instruct on an English construction-FAQ retrieval set.

`faq` turns the `zaragoza-construction-faq` package (Zaragoza AB, CC BY 4.0) into FlagEmbedding
train/test JSONL with BM25 hard negatives; launch/prepare_demo.py is its command line.
"""
from engine.demo.faq import BM25, DemoDataError, faq_records, write_faq_splits

__all__ = ["BM25", "DemoDataError", "faq_records", "write_faq_splits"]
