"""Prepare the demo: write the FAQ train/test splits, then convert SmolLM2-135M-Instruct.

    python launch/prepare_demo.py [--out DIR] [--cache DIR] [--skip-model]

The cache defaults to $EMBER_CACHE, else <repo>/.cache/ember; the data goes to <cache>/demo/
unless --out names another folder. Both steps are idempotent, so `make demo` can call this
every time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts launch/ on the path, not the repository that holds `engine`.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write the demo's FAQ retrieval splits and model.")
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: $EMBER_CACHE or <repo>/.cache/ember)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSONL splits (default: <cache>/demo)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of questions held out for evaluation")
    parser.add_argument("--num-negatives", type=int, default=3, help="BM25 hard negatives per query")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--skip-model", action="store_true", help="only write the data; skip the GGUF conversion")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from engine.demo.faq import DemoDataError, read_manifest, write_faq_splits

    args = parse_args(argv)
    from engine.model.gguf import default_cache_dir

    cache = args.cache or Path(default_cache_dir())
    out = args.out or cache / "demo"
    print(f"[prepare_demo] writing FAQ splits to {out}", flush=True)
    try:
        train_path, test_path = write_faq_splits(
            out, test_fraction=args.test_fraction, num_negatives=args.num_negatives, seed=args.seed
        )
    except DemoDataError as err:
        print(f"[prepare_demo] error: {err}", file=sys.stderr)
        return 2
    counts = read_manifest(out)["counts"]
    print(f"[prepare_demo] train: {train_path} ({counts['train_queries']} queries)")
    print(f"[prepare_demo] test:  {test_path} ({counts['test_queries']} queries, corpus of {counts['test_corpus']} answers)")
    if args.skip_model:
        print("[prepare_demo] --skip-model: not converting SmolLM2")
        return 0
    # Imported here: the data step must work even where the model tooling is absent.
    try:
        from engine.model.gguf import ensure_smollm2
    except ImportError as err:
        print(f"[prepare_demo] error: cannot convert the model ({err}); use --skip-model for the data only", file=sys.stderr)
        return 2

    print(f"[prepare_demo] converting SmolLM2-135M-Instruct (GGUF -> safetensors) under {cache}", flush=True)
    try:
        model_dir = ensure_smollm2(cache)
    except ValueError as err:  # the converter's user-facing errors are ValueError subclasses
        print(f"[prepare_demo] error: {err}", file=sys.stderr)
        return 2
    print(f"[prepare_demo] model: {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
