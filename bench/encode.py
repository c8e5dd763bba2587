"""Encode throughput: Ember's Embedder.encode against sentence-transformers on one exported folder.

    python bench/encode.py                                # demo export, 10,000 texts of 50-500 tokens, batch 32
    python bench/encode.py --texts 300                    # a quick look
    python bench/encode.py --model PATH --batch-size 64 --threads 2 --out rows.json
    python bench/encode.py --model base                   # the base model through Ember's export (built once)
    python bench/encode.py --texts 200 --profile          # torch.profiler's top operators of each system

Workload. N documents of mixed lengths: questions and answers of the demo FAQ
(.cache/ember/demo/*.jsonl) joined in a seeded random order and cut at a random target length
in [--min-tokens, --max-tokens] tokens of the export's tokenizer (the EOS the export appends
comes on top). Both systems embed them as documents (no query instruction), on CPU in float32,
`--batch-size` texts per forward, truncating at `--max-len` tokens (default 512, so nothing is
cut: the demo export's own doc_max_len of 128 would cut most of them, and sentence-transformers
would cut at its max_seq_length):
  ember  engine.Embedder.from_pretrained(model, doc_max_len=max_len).encode(texts, batch_size)
  st     SentenceTransformer(model).encode_document(texts, batch_size), max_seq_length = max_len

Each system runs in its own fresh interpreter (this script with --case), so neither one's imports
or allocator state touches the other's numbers. Within it: load the model, encode one batch as a
warm-up, reset the peak RSS (VmHWM), then time one encode of all N texts. Peak RSS is the
process's VmHWM over that encode (weights and imports included); "growth" is that peak less the
RSS just before it. After the timing each case tokenizes the texts its own way (Ember's
TextEncoder.documents; the sentence-transformers module's preprocess) and returns the ids with
the vectors.

Checks (exit status 1, with the reason, when one fails): both systems see the same token ids
for every text, and the cosine of the two vectors of every text is at least 0.99999.

Models: --model demo (default) is outputs/demo/export, the export `make demo` trains; where it
is missing, the bench falls back to --model base: the base model (.cache/ember/smollm2-135m-instruct)
with the demo's task settings and no LoRA, written by Ember's export code (engine/export.py)
to outputs/bench/encode_base_export once and reused. Any other value is an export folder.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_EXPORT = os.path.join(REPO, "outputs", "demo", "export")
BASE_EXPORT = os.path.join(REPO, "outputs", "bench", "encode_base_export")
DEMO_DATA = os.path.join(REPO, ".cache", "ember", "demo")
SYSTEMS = ("ember", "st")
NAMES = {"ember": "Ember Embedder.encode", "st": "sentence-transformers"}
MIN_COSINE = 0.99999

# ---- process memory (Linux; as bench/kernel_bench.py) -------------------------------------------


def status_bytes(key: str) -> int:
    """A /proc/self/status field in bytes: VmRSS (resident now), VmHWM (peak since reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


# ---- texts --------------------------------------------------------------------------------------


def faq_strings(data_dir: str) -> list[str]:
    """Every distinct question and answer of the FAQ files, in file order."""
    seen: dict[str, None] = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                for text in [row.get("query", ""), *row.get("pos", []), *row.get("neg", [])]:
                    if text and text.strip():
                        seen.setdefault(text.strip(), None)
    if not seen:
        raise SystemExit(f"no FAQ texts under {data_dir} (run `python launch/prepare_demo.py`, or pass --data)")
    return list(seen)


def make_texts(tokenizer_file: str, sources: list[str], count: int, min_tokens: int, max_tokens: int,
               seed: int) -> tuple[list[str], list[int]]:
    """`count` texts, each FAQ strings joined in a seeded random order and cut at a token start so
    that it holds a random target of [min_tokens, max_tokens] tokens; -> (texts, their token counts
    without special tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    source_tokens = [len(e.ids) for e in tokenizer.encode_batch(sources, add_special_tokens=False)]
    rng = random.Random(seed)
    targets, drafts = [], []
    for _ in range(count):
        target = rng.randint(min_tokens, max_tokens)
        parts, tokens = [], 0
        while tokens < target + 8:  # a few spare: joins may merge tokens
            k = rng.randrange(len(sources))
            parts.append(sources[k])
            tokens += source_tokens[k] + 1
        targets.append(target)
        drafts.append(" ".join(parts))
    texts = []
    for text, target, enc in zip(drafts, targets, tokenizer.encode_batch(drafts, add_special_tokens=False)):
        texts.append(text[: enc.offsets[target][0]] if len(enc.ids) > target else text)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return texts, lengths


# ---- the export ---------------------------------------------------------------------------------


def base_export() -> str:
    """The base model with the demo's task settings, no LoRA, through engine/export.py (once)."""
    if os.path.isfile(os.path.join(BASE_EXPORT, "ember_task.json")):
        return BASE_EXPORT
    import torch

    from engine.build import build_task_model, load_tokenizer
    from engine.cli import compose
    from engine.export import export_task

    print(f"writing an export of the base model to {os.path.relpath(BASE_EXPORT, REPO)} (once)", flush=True)
    cfg, _ = compose(["+exp=demo", "lora.rank=0"])
    tokenizer = load_tokenizer(cfg.model)
    task = build_task_model(cfg, torch.device("cpu"), tokenizer)
    return export_task(task, cfg, tokenizer, BASE_EXPORT)


def resolve_model(name: str) -> tuple[str, str]:
    """(folder, what it is) for --model."""
    if name == "demo":
        if os.path.isfile(os.path.join(DEMO_EXPORT, "ember_task.json")):
            return DEMO_EXPORT, "the demo export (outputs/demo/export, trained by `make demo`)"
        print("no outputs/demo/export (run `make demo` for the trained one): using --model base", flush=True)
        name = "base"
    if name == "base":
        return base_export(), "the base model exported by Ember with the demo's task settings, no LoRA (untrained)"
    if not os.path.isfile(os.path.join(name, "modules.json")):
        raise SystemExit(f"--model {name}: not an embedding export (no modules.json)")
    return os.path.abspath(name), "an export folder"


# ---- one system in this process (--case) --------------------------------------------------------


def _load(case: dict):
    """(encode(texts) -> vectors, texts -> document token ids, facts about the loaded model)."""
    import torch

    if case["system"] == "ember":
        from engine.api import Embedder

        model = Embedder.from_pretrained(case["model"], device="cpu", dtype=torch.float32,
                                         doc_max_len=case["max_len"])
        info = {"dtype": str(next(model.task.parameters()).dtype)}
        return (lambda texts: model.encode(texts, batch_size=case["batch_size"]),
                lambda texts: model.text_encoder.documents(texts), info)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(case["model"], device="cpu")
    model = model.float()
    model.max_seq_length = case["max_len"]
    prompt = next((model.prompts[k] for k in ("document", "passage", "corpus") if k in model.prompts), None)

    def ids(texts):
        out = []
        for start in range(0, len(texts), 256):
            features = model.preprocess(texts[start : start + 256], prompt=prompt)
            for row, mask in zip(features["input_ids"].tolist(), features["attention_mask"].tolist()):
                out.append([t for t, m in zip(row, mask) if m])
        return out

    config = model[0].auto_model.config
    info = {"dtype": str(next(model.parameters()).dtype), "attention": getattr(config, "_attn_implementation", None),
            "document_prompt": prompt}
    return (lambda texts: model.encode_document(texts, batch_size=case["batch_size"], convert_to_numpy=True,
                                                       show_progress_bar=False),
            ids, info)


def run_here(case: dict) -> dict:
    """Load, warm up on one batch, then time one encode of every text; vectors and ids go to case['result']."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    with open(case["texts"]) as f:
        texts = json.load(f)
    start = time.perf_counter()
    encode, token_ids, info = _load(case)
    load_seconds = time.perf_counter() - start
    encode(texts[: case["batch_size"]])  # warm-up: thread pools, lazy imports, first allocations
    load_peak = status_bytes("VmHWM:")
    profiler = None
    if case.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.__enter__()
    before = status_bytes("VmRSS:")
    reset_peak_rss()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start, start_cpu = time.perf_counter(), time.process_time()
    vectors = np.asarray(encode(texts), dtype=np.float32)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = status_bytes("VmHWM:")
    after = resource.getrusage(resource.RUSAGE_SELF)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=case["profile"]),
              file=sys.stderr)
    ids = token_ids(texts)
    lengths = np.array([len(s) for s in ids], dtype=np.int64)
    np.savez(case["result"], vectors=vectors, ids=np.array([t for s in ids for t in s], dtype=np.int64),
             lengths=lengths)
    return {"system": case["system"], "seconds": seconds, "cpu_seconds": cpu_seconds, "load_seconds": load_seconds,
            "texts": len(texts), "tokens": int(lengths.sum()), "peak_rss": peak, "rss_before": before,
            "load_peak_rss": load_peak, "sys_seconds": after.ru_stime - usage.ru_stime,
            "minor_page_faults": after.ru_minflt - usage.ru_minflt, "threads": torch.get_num_threads(), "torch": torch.__version__, **info}


def start_case(case: dict) -> subprocess.Popen:
    """One system in a fresh interpreter; its last stdout line will be the JSON result."""
    env = {**os.environ, "PYTHONPATH": REPO}
    if case["system"] == "ember":
        from engine.host_memory import request_huge_pages

        request_huge_pages(env)  # Ember's environment, as its launch scripts set it (engine/host_memory.py)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish_case(case: dict, process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if case.get("profile"):
        print(f"\n--- torch.profiler, {NAMES[case['system']]}: top operators by self CPU time "
              f"(throughput under the profiler is not the benchmark's) ---")
        print(stderr[-20000:])
    if process.returncode != 0:
        tail = "\n".join((stderr.strip() or "killed").splitlines()[-15:])
        raise SystemExit(f"the {case['system']} case failed (exit {process.returncode}):\n{tail}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_cases(cases: list[dict], jobs: int) -> list[dict]:
    """Each case in its own interpreter, `jobs` at a time (1: one after the other, as timings need)."""
    results, running = [], []

    def finish_next() -> None:
        case, process = running.pop(0)
        row = finish_case(case, process)
        print(f"{NAMES[case['system']]}: {row['texts']} texts in {row['seconds']:.1f} s", flush=True)
        results.append(row)

    try:
        for case in cases:
            # Minutes per system at the default 10,000 texts: say what is running.
            print(f"{NAMES[case['system']]}: loading and encoding in its own interpreter ...", flush=True)
            running.append((case, start_case(case)))
            if len(running) >= jobs:
                finish_next()
        while running:
            finish_next()
    finally:
        for _, process in running:  # one failed: stop the ones still running
            process.kill()
            process.wait()
    return results


# ---- comparison ---------------------------------------------------------------------------------


def split_ids(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def compare(ember: dict, st: dict, min_cosine: float = MIN_COSINE) -> tuple[dict, list[str]]:
    """Token ids and vectors of the two systems, text by text -> (stats, problems); no problems = pass.

    ember / st: {"vectors": (N, d), "ids": flat ids, "lengths": (N,)} as the cases save them."""
    problems = []
    a, b = np.asarray(ember["vectors"], dtype=np.float64), np.asarray(st["vectors"], dtype=np.float64)
    if a.shape != b.shape:
        return {"min_cosine": float("nan")}, [f"vector shapes differ: Ember {a.shape}, sentence-transformers {b.shape}"]
    ids_a, ids_b = split_ids(ember["ids"], ember["lengths"]), split_ids(st["ids"], st["lengths"])
    differ = [i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if len(x) != len(y) or not np.array_equal(x, y)]
    if differ:
        i = differ[0]
        x, y = ids_a[i], ids_b[i]
        at = next((j for j in range(min(len(x), len(y))) if x[j] != y[j]), min(len(x), len(y)))
        problems.append(f"token ids differ for {len(differ)} of {len(ids_a)} texts; first: text {i}, "
                        f"{len(x)} tokens (Ember) vs {len(y)} (sentence-transformers), first difference at "
                        f"position {at}: Ember {x[at:at + 5].tolist()} vs sentence-transformers {y[at:at + 5].tolist()}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(axis=1) / np.maximum(norms, 1e-30)
    worst = int(np.argmin(cosine)) if len(cosine) else -1
    stats = {"min_cosine": float(cosine.min()) if len(cosine) else float("nan"), "worst_text": worst,
             "token_id_mismatches": len(differ), "max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0}
    low = int((cosine < min_cosine).sum())
    if low or not np.isfinite(cosine).all():
        problems.append(f"cosine below {min_cosine} for {low} of {len(cosine)} texts; lowest {cosine.min():.7f} "
                        f"at text {worst}")
    return stats, problems


# ---- report -------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(rows: dict[str, dict]) -> str:
    st = rows.get("st")
    lines = ["| system | texts/s | tokens/s | seconds | CPU s | peak RSS | growth in encode | speed vs ST | "
             "CPU s vs ST | peak RSS vs ST |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for system, r in rows.items():
        speed = f"{(r['texts'] / r['seconds']) / (st['texts'] / st['seconds']):.2f}x" if st else "-"
        cpu = f"{r['cpu_seconds'] / st['cpu_seconds']:.2f}x" if st else "-"
        memory = f"{r['peak_rss'] / st['peak_rss']:.2f}x" if st else "-"
        lines.append(f"| {NAMES[system]} | {r['texts'] / r['seconds']:,.1f} | {r['tokens'] / r['seconds']:,.0f} | "
                     f"{r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {mib(r['peak_rss'])} | "
                     f"{mib(r['peak_rss'] - r['rss_before'])} | {speed} | {cpu} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo (default), base, or an export folder")
    parser.add_argument("--texts", type=int, default=10_000, help="number of texts N")
    parser.add_argument("--min-tokens", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--max-len", type=int, default=512, help="truncation length of both systems (EOS included)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=DEMO_DATA, help="folder of FAQ *.jsonl files the texts come from")
    parser.add_argument("--profile", type=int, nargs="?", const=25, default=0,
                        help="print torch.profiler's top N operators of each system's encode (default 25)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cases run at once; above 1 the systems share the CPU and the timings mean nothing "
                             "(a quick check of the output and the checks, as the test does)")
    parser.add_argument("--out", help="write the rows and checks as JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_here(json.loads(args.case))))
        return 0
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need 1 <= --min-tokens <= --max-tokens")
    if args.max_tokens + 2 > args.max_len:
        print(f"note: texts up to {args.max_tokens} tokens + EOS may exceed --max-len {args.max_len}: "
              f"both systems truncate them", flush=True)

    model, what = resolve_model(args.model)
    texts, lengths = make_texts(os.path.join(model, "tokenizer.json"), faq_strings(args.data), args.texts,
                                args.min_tokens, args.max_tokens, args.seed)
    print(f"model: {os.path.relpath(model, REPO) if model.startswith(REPO) else model} ({what})")
    print(f"texts: {len(texts)} from the FAQ in {args.data}, seed {args.seed}; tokens per text (before the EOS): "
          f"min {min(lengths)}, median {int(np.median(lengths))}, max {max(lengths)}, mean {np.mean(lengths):.0f}")
    print(f"batch size {args.batch_size}, max length {args.max_len}, CPU float32, documents (no instruction)",
          flush=True)

    rows, saved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = os.path.join(tmp, "texts.json")
        with open(texts_file, "w") as f:
            json.dump(texts, f)
        cases = [dict(system=system, model=model, texts=texts_file, batch_size=args.batch_size, max_len=args.max_len,
                      threads=args.threads, result=os.path.join(tmp, f"{system}.npz"), profile=args.profile)
                 for system in SYSTEMS]
        for case, row in zip(cases, run_cases(cases, args.jobs)):
            rows[case["system"]] = row
            with np.load(case["result"]) as z:
                saved[case["system"]] = {k: z[k] for k in z.files}
    stats, problems = compare(saved["ember"], saved["st"])

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    e = rows["ember"]
    print(f"\nmachine: {cores} cores ({usable} usable), torch {e['torch']}, {e['threads']} torch threads "
          f"(sentence-transformers: {rows['st']['threads']}); sentence-transformers attention: "
          f"{rows['st'].get('attention')}\n")
    print(table(rows))
    if args.jobs > 1:
        print(f"(--jobs {args.jobs}: the systems ran at the same time, so these timings are not a comparison)")
    print(f"\nmin cosine {stats['min_cosine']:.7f} over {len(texts)} texts (text {stats['worst_text']}), "
          f"max |difference| {stats['max_abs_diff']:.2e}; token ids identical for "
          f"{len(texts) - stats['token_id_mismatches']} of {len(texts)} texts")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model, "args": {k: v for k, v in vars(args).items() if k != "case"},
                       "lengths": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)},
                       "rows": rows, "checks": {**stats, "problems": problems}}, f, indent=1)
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        return 1
    print(f"PASSED: same token ids for every text, cosine >= {MIN_COSINE} for every text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
