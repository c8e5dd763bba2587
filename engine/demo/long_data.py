"""Synthetic 32K-byte documents for exp/demo_long: a needle in a haystack, per query.

    python -m engine.demo.long_data [--out DIR] [--queries 8] [--doc-bytes 32767] [--seed 0]

Each line is FlagEmbedding JSONL: the query asks for the access code of one vault; its positive
is a long document of filler prose with that vault's code stated once at a seeded depth; its
negative is the same kind of document about another vault. With the byte-level tokenizer every
byte is one token, so a document of 32767 bytes plus the EOS the embedding task appends is
exactly 32768 tokens (data.doc_max_len of the experiment): nothing is truncated.

Nothing here is shipped: the folder (default <cache>/demo_long, the cache being $EMBER_CACHE or
<repo>/.cache/ember, which git ignores) is rebuilt from the seed in well under a second, and a
second call with the same parameters leaves the files untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

# Bump when the output changes for the same parameters, so stale caches rebuild.
FORMAT_VERSION = 2
TRAIN_FILE = "train.jsonl"
MANIFEST_FILE = "manifest.json"

# Filler vocabulary: plain ASCII words without "no" or "ye", which the byte-level tokenizer merges
# into one token (for "yes"/"no"), so that bytes == byte-tokenizer tokens.
_SUBJECTS = ("the keeper", "a clerk", "the old surveyor", "the night guard", "a courier", "the archivist")
_VERBS = ("walked past", "counted", "wrote about", "repaired", "locked", "described", "measured")
_OBJECTS = ("the west corridor", "a row of shelves", "the brass ledger", "the east stairwell",
            "an empty cabinet", "the lamp by the door", "the map of the lower rooms")
_TAILS = ("before dawn", "without a word", "twice that week", "as the rain began", "in the usual order")
_CODE_WORDS = ("amber", "birch", "cobalt", "delta", "ember", "flint", "granite", "harbor", "indigo", "juniper")


def vault_fact(vault: int, code: str) -> str:
    """The one sentence a document's retrieval depends on."""
    return f" The access code of vault {vault} is {code}."


def _filler_sentence(rng: random.Random) -> str:
    return f" {rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def long_document(vault: int, code: str, doc_bytes: int, rng: random.Random) -> str:
    """Exactly `doc_bytes` ASCII bytes of filler with `vault_fact` inserted at a random depth."""
    fact = vault_fact(vault, code)
    if doc_bytes <= len(fact):
        raise ValueError(f"doc_bytes={doc_bytes} cannot hold the fact sentence ({len(fact)} bytes)")
    parts, size = [], 0
    while size < doc_bytes - len(fact):
        sentence = _filler_sentence(rng)
        parts.append(sentence)
        size += len(sentence)
    parts.insert(rng.randrange(len(parts) + 1), fact)
    # Trim filler from the end (never the fact) to the exact size.
    text = "".join(parts)
    excess = len(text) - doc_bytes
    if text.endswith(fact):
        return text[: len(text) - len(fact) - excess] + fact
    return text[:doc_bytes]


def long_examples(num_queries: int, doc_bytes: int, seed: int) -> list[dict]:
    """`num_queries` lines: a query about vault k, its document, and one about vault k+1 as the negative."""
    rng = random.Random(seed)
    codes = [f"{rng.choice(_CODE_WORDS)}-{rng.randrange(1000, 10000)}" for _ in range(num_queries + 1)]
    lines = []
    for k in range(num_queries):
        other = (k + 1) % (num_queries + 1)
        lines.append({
            "query": f"What is the access code of vault {k}?",
            "pos": [long_document(k, codes[k], doc_bytes, rng)],
            "neg": [long_document(other, codes[other], doc_bytes, rng)],
        })
    return lines


def write_long_data(out_dir: Path, num_queries: int = 8, doc_bytes: int = 32767, seed: int = 0) -> Path:
    """Write <out_dir>/train.jsonl (atomically) unless a manifest with these parameters is there."""
    out_dir = Path(out_dir)
    params = {"format_version": FORMAT_VERSION, "num_queries": num_queries, "doc_bytes": doc_bytes, "seed": seed}
    train_path = out_dir / TRAIN_FILE
    manifest_path = out_dir / MANIFEST_FILE
    if train_path.is_file() and manifest_path.is_file() and json.loads(manifest_path.read_text()) == params:
        return train_path
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = long_examples(num_queries, doc_bytes, seed)
    _write_atomically(train_path, "".join(json.dumps(line) + "\n" for line in lines))
    _write_atomically(manifest_path, json.dumps(params, indent=2) + "\n")
    return train_path


def _write_atomically(path: Path, text: str) -> None:
    # A half-written file after an interrupt would pass the manifest check on the next run.
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from engine.model.gguf import default_cache_dir

    parser = argparse.ArgumentParser(description="Write exp/demo_long's synthetic 32K-byte documents.")
    parser.add_argument("--out", type=Path, default=None, help="folder (default: <cache>/demo_long)")
    parser.add_argument("--queries", type=int, default=8, help="lines, each with one positive and one negative")
    parser.add_argument("--doc-bytes", type=int, default=32767, help="bytes (= byte-tokenizer tokens) per document")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or Path(default_cache_dir()) / "demo_long"
    try:
        path = write_long_data(out, args.queries, args.doc_bytes, args.seed)
    except ValueError as err:
        print(f"[demo_long] error: {err}", file=sys.stderr)
        return 2
    print(f"[demo_long] {path}: {args.queries} queries, documents of {args.doc_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
