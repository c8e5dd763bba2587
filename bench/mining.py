"""Mining parity on the demo data: launch/mine.py against sentence-transformers' mine_hard_negatives,
with the same model and the same options, counting the queries whose negatives are identical.

    python bench/mining.py                       # both models, every setting; prints the table
    python bench/mining.py --settings top --models export

Models: the zero-shot SmolLM2-135M folder (launch/prepare_demo.py's; mine.py reads the plain Hugging
Face folder with the demo's task settings, +exp=demo; sentence-transformers reads an export of those
same weights and settings, written once under --out) and the demo's trained export
(outputs/demo/export, `make demo`). Each side encodes each model once (mine.cache_folder /
cache_folder, one per model): the first setting's times include the encoding. The results also go to --out/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SEED = 7
SETTINGS = {
    "top": {},
    # NV-Retriever's TopK-PercPos (95%); the whole corpus as window, since the zero-shot model scores
    # most texts above the positive (the derived window of 32 leaves it no negative at all).
    "margin": {"relative_margin": 0.05, "range_max": 300},
    "random": {"range_min": 2, "range_max": 20, "sampling_strategy": "random"},
}


def models(cache: str) -> dict[str, str]:
    return {"zero-shot": os.path.join(cache, "smollm2-135m-instruct"),
            "export": os.path.join(REPO, "outputs", "demo", "export")}


def st_folder(name: str, path: str, out: str) -> str:
    """A folder sentence-transformers loads with the settings mine.py uses: the export itself, or for
    the zero-shot model an export of its weights with the demo's task settings (written once)."""
    if name == "export":
        return path
    folder = os.path.join(out, "zero_shot_export")
    if not os.path.isfile(os.path.join(folder, "modules.json")):
        from engine.api import load_task_model
        from engine.build import load_tokenizer
        from engine.cli import compose
        from engine.export import export_task

        cfg, _ = compose(["+exp=demo", f"model.path={path}", "lora.rank=0"])
        task, _ = load_task_model(path, cfg.task, cfg.data, cfg.model.causal)
        export_task(task, cfg, load_tokenizer(cfg.model), folder)
    return folder


def run_ember(path: str, options: dict, out: str, cache: str) -> tuple[dict[str, list[str]], float]:
    """launch/mine.py as a user runs it: ({query: negatives}, wall seconds)."""
    mined = os.path.join(out, f"ember_{abs(hash((path, repr(options))))}.jsonl")
    args = ["+exp=demo", f"model.path={path}", f"mine.output={mined}", f"mine.cache_folder={cache}",
            f"mine.seed={SEED}", *(f"mine.{k}={v}" for k, v in options.items())]
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(REPO, "launch", "mine.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"launch/mine.py failed:\n{done.stderr[-3000:]}")
    found: dict[str, list[str]] = {}
    with open(mined) as f:
        for line in f:
            record = json.loads(line)
            found.setdefault(record["query"], record["neg"])
    return found, seconds


def run_st(model, lines: list[dict], options: dict, cache: str) -> tuple[dict[str, list[str]], float]:
    """mine_hard_negatives over the file's (query, positive) rows: ({query: negatives}, seconds)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    rows = [(line["query"], p) for line in lines for p in line["pos"]]
    dataset = Dataset.from_dict({"query": [q for q, _ in rows], "positive": [p for _, p in rows]})
    random.seed(SEED)  # the sampler sentence-transformers draws from
    start = time.perf_counter()
    out = mine_hard_negatives(dataset, model, output_format="labeled-list", cache_folder=cache, verbose=False,
                              **options)
    seconds = time.perf_counter() - start
    found: dict[str, list[str]] = {}
    for row in out:
        found.setdefault(row["query"], row["positive"][1:])
    return found, seconds


def main() -> None:
    from engine.model.gguf import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="zero-shot,export")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", default=os.path.join(REPO, "outputs", "bench_mining"))
    args = parser.parse_args()
    cache = default_cache_dir()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(cache, "demo", "train.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    queries = list(dict.fromkeys(line["query"] for line in lines))
    results = []
    print(f"{'model':<10} {'setting':<8} {'identical':>14} {'negatives':>10} {'mine.py s':>10} {'ST s':>8}", flush=True)
    for name in args.models.split(","):
        from sentence_transformers import SentenceTransformer

        path = models(cache)[name]
        st_model = SentenceTransformer(st_folder(name, path, args.out), device="cpu")
        for setting in args.settings.split(","):
            options = SETTINGS[setting]
            ember, ember_s = run_ember(path, options, args.out, os.path.join(args.out, "cache_ember"))
            # One cache per model: sentence-transformers keys its cache by the model card's base model
            # (empty for both here), the prompts and the texts, not by the weights.
            st, st_s = run_st(st_model, lines, options, os.path.join(args.out, f"cache_st_{name}"))
            same = sum(ember.get(q, []) == st.get(q, []) for q in queries)
            total_negatives = sum(len(n) for n in ember.values())
            results.append({"model": name, "setting": setting, "options": options, "identical": same,
                            "queries": len(queries), "negatives": total_negatives,
                            "mine_seconds": ember_s, "st_seconds": st_s})
            print(f"{name:<10} {setting:<8} {f'{same}/{len(queries)}':>14} {total_negatives:>10} {ember_s:>10.1f} "
                  f"{st_s:>8.1f}", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
