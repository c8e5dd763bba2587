"""One training step of the demo recipe, Ember against the tools people train embedders with.

    python bench/peers.py                                          # faq at batch 16, 32; long at 2, 4
    python bench/peers.py --mixes faq --batches-faq 4 --steps 1    # a quick look
    python bench/peers.py --systems ember st_mnrl --out peers.json
    python bench/peers.py --mixes faq --batches-faq 16 --rounds 3   # each system 3 times, in turn: the fastest
    python bench/peers.py --model DIR --data FILE.jsonl --override task.query_instruction=find

The same model, data, token ids, LoRA (r=16 on q, k, v, o, gate, up, down), loss and optimizer
(AdamW, Ember's lr, betas and weight decay, gradient clipping at train.clip_grad_norm) in every
system; each system times its own training step:
  ember            Trainer.train_step on the packed batch (cu_seqlens, no padding), the step
                   counter held at 0 so the same batch repeats; its time includes collating
                   (tokenizing) the batch, which the peers are handed done
  ember_grad_cache the same with train.grad_cache=true (chunks of train.grad_cache_chunk sequences)
  st_mnrl          sentence-transformers: SentenceTransformer([Transformer, Pooling("mean")]) in
                   float32, its inner model wrapped by peft.get_peft_model, and
                   MultipleNegativesRankingLoss(scale=1/temperature) (cos_sim, query_to_doc only:
                   candidates are every positive and hard negative of the batch) called on
                   pre-tokenized columns [anchors, positives, negatives], then backward, clip and
                   optimizer step. That is its trainer's step without the data loader. Each column
                   is right-padded to its longest row; on CPU sentence-transformers cannot unpad
                   (that needs flash attention's varlen kernels)
  st_cached_mnrl   the same with CachedMultipleNegativesRankingLoss, mini_batch_size = Ember's chunk
  hf_peft          transformers AutoModel + peft, queries and documents right-padded per tower,
                   mean pooling and InfoNCE written in plain PyTorch (bench/train_step.py's peer)
Every system gets Ember's own token ids (its collated step-0 batch: queries templated, documents
query-major, q0's positive, q0's negatives, q1's positive, ...) and the same LoRA weights:
Ember's initial lora_A and one seeded random lora_B (not zero, so the adapters change the loss).

Equal-loss check: the loss of each system's first step (the warm-up, before any update) must
agree with Ember's (the first system run, where --systems leaves Ember out) to 1e-4 (float32;
padded and packed attention sum in different orders); a disagreement prints the losses and exits
non-zero before the next case, so an --override the peers cannot follow (task.pooling=last) fails. Then s/step is the mean
over --steps steps after the warm-up (with --rounds N, each system runs N times, the systems in
turn, and its fastest run is reported: this VM's speed drifts by +-15% over minutes, and a slow
spell should not decide a ratio); tokens/s counts real (non-pad) tokens; peak RSS (steps) is
the process's VmHWM over the warm-up and timed steps (reset through /proc/self/clear_refs after
loading), peak RSS (process) its VmHWM over its whole life, loading included. Every system runs
in a fresh interpreter (this script with --case), so each peak is its own (--in-process, for
tests, runs them all in this one and reports no peak).

Host memory: Ember's processes run with the settings its launch scripts and Trainer apply
(engine/host_memory.py); the peers run with torch's defaults, as their users run them, unless
--peers-host-memory gives them the same settings (what is left is then the systems' own work).

Length mixes: faq is the demo data as is (data.doc_max_len of the demo, 128); long writes
documents of 512-2,048 tokens (FAQ answers concatenated up to a seeded random target length per
document, counted with the model's tokenizer) to --work and sets data.doc_max_len=2048.
Needs the demo assets (`python launch/prepare_demo.py`) unless --model and --data say otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Run as a script, bench/ is first on sys.path, and a bench file named like a package the peers
# import (a bench/kernels.py against Hugging Face's `kernels`) would shadow it.
sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

from engine.host_memory import request_huge_pages  # noqa: E402

SYSTEMS = ["ember", "ember_grad_cache", "st_mnrl", "st_cached_mnrl", "hf_peft"]
LOSS_TOLERANCE = 1e-4
LONG_DOC_TOKENS = (512, 2048)
LORA_B_STD = 0.02  # small, but moves the loss well past the tolerance
SEED = 0


# ---- process memory (Linux) ---------------------------------------------------------------------


def status_bytes(key: str) -> int:
    """A /proc/self/status field in bytes: VmRSS (resident now), VmHWM (peak since reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ---- the shared batch ---------------------------------------------------------------------------


def ember_overrides(args, mix: str, batch: int, data: str) -> list[str]:
    overrides = ["+exp=demo", f"model.path={args.model}", f"data.train={data}", "data.eval=",
                 f"train.batch_size={batch}", f"train.output_dir={os.path.join(args.work, 'run')}",
                 "train.tensorboard=false", *args.override]
    if mix == "long":
        overrides += [f"data.doc_max_len={LONG_DOC_TOKENS[1]}", f"data.max_len={LONG_DOC_TOKENS[1]}"]
    return overrides


def build_trainer(overrides: list[str]):
    from engine.cli import compose
    from engine.config import validate
    from engine.train.trainer import Trainer

    cfg, yaml = compose(overrides)
    validate(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # its log lines and truncation warnings
        return Trainer(cfg, yaml)


def lora_key(name: str) -> str:
    """`backbone.model.layers.3.mlp.up_proj` and peft's `base_model.model.layers.3.mlp.up_proj`
    -> `layers.3.mlp.up_proj`."""
    return name[name.index("layers."):]


def step0_batch(trainer):
    return trainer.collator([trainer.train_examples[i] for i in trainer.sampler.indices(0)], 0)


def rows(seqs) -> list[list[int]]:
    cu = seqs.cu_seqlens.tolist()
    return [seqs.input_ids[a:b].tolist() for a, b in zip(cu[:-1], cu[1:])]


def prepare(args, mix: str, batch: int, data: str) -> str:
    """Build Ember's trainer once, write its step-0 token ids, LoRA weights and recipe; return the file."""
    from engine.model.lora import LoRALinear

    overrides = ember_overrides(args, mix, batch, data)
    trainer = build_trainer(overrides)
    cfg, encoded = trainer.cfg, step0_batch(trainer)
    generator = torch.Generator().manual_seed(SEED)
    lora = {}
    for name, module in trainer.model.named_modules():
        if isinstance(module, LoRALinear):
            b = LORA_B_STD * torch.randn(module.lora_B.shape, generator=generator)
            lora[lora_key(name)] = (module.lora_A.detach().clone(), b)
    from bench.train_step import step_flops

    flops, block_flops = step_flops(trainer, encoded)
    shared = dict(
        overrides=overrides, queries=rows(encoded.queries), docs=rows(encoded.docs), group_size=encoded.group_size,
        lora=lora, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=list(cfg.lora.targets),
        temperature=cfg.task.temperature, lr=cfg.train.lr, betas=list(cfg.train.betas),
        weight_decay=cfg.train.weight_decay, clip=cfg.train.clip_grad_norm, chunk=cfg.train.grad_cache_chunk,
        model_flops=flops, block_flops=block_flops, real_tokens=encoded.num_tokens,
    )
    path = os.path.join(args.work, f"batch_{mix}_{batch}.pt")
    torch.save(shared, path)
    return path


def write_long_data(source: str, tokenizer_path: str, out: str, lines: int) -> str:
    """FAQ lines whose positive and negative grow, by appending other FAQ answers, to a seeded
    random length in LONG_DOC_TOKENS (token counts summed per answer)."""
    from transformers import AutoTokenizer

    with open(source) as f:
        examples = [json.loads(line) for line in f if line.strip()][:lines]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    pool = [text for e in examples for text in e["pos"] + e.get("neg", [])]
    counts = {}

    def count(text: str) -> int:
        if text not in counts:
            counts[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return counts[text]

    rng = random.Random(SEED)

    def grow(text: str) -> str:
        target, parts, total = rng.randint(*LONG_DOC_TOKENS), [text], count(text)
        while total < target:
            parts.append(rng.choice(pool))
            total += count(parts[-1])
        return "\n\n".join(parts)

    with open(out, "w") as f:
        for e in examples:
            line = {"query": e["query"], "pos": [grow(e["pos"][0])]}
            if e.get("neg"):
                line["neg"] = [grow(e["neg"][0])]
            f.write(json.dumps(line) + "\n")
    return out


# ---- the systems (each run by run_case in its own interpreter) ----------------------------------


def pad(token_rows: list[list[int]]) -> dict:
    """Right padding to the longest row, as a tokenizer's padding=True gives."""
    width = max(len(r) for r in token_rows)
    ids = torch.zeros(len(token_rows), width, dtype=torch.long)
    mask = torch.zeros(len(token_rows), width, dtype=torch.long)
    for i, r in enumerate(token_rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def padded_tokens(token_rows: list[list[int]], rows_per_chunk: int | None = None) -> int:
    """Tokens a padded forward computes on: each chunk of rows at its longest row's width."""
    step = rows_per_chunk or len(token_rows)
    return sum(len(token_rows[i:i + step]) * max(len(r) for r in token_rows[i:i + step])
               for i in range(0, len(token_rows), step))


def peft_config(shared: dict):
    from peft import LoraConfig

    return LoraConfig(r=shared["rank"], lora_alpha=shared["alpha"], target_modules=shared["targets"],
                      lora_dropout=0.0)


@torch.no_grad()
def load_peft_lora(model: torch.nn.Module, shared: dict) -> None:
    from peft.tuners.lora import LoraLayer

    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = lora_key(name)
            a, b = shared["lora"][key]
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
            if abs(module.scaling["default"] - shared["alpha"] / shared["rank"]) > 1e-12:
                raise SystemExit(f"error: peft scaling {module.scaling['default']} at {key} is not Ember's alpha/r")
            seen.add(key)
    if seen != set(shared["lora"]):
        raise SystemExit(f"error: peft adapted {len(seen)} layers, Ember {len(shared['lora'])}: "
                         f"{sorted(seen ^ set(shared['lora']))[:4]}")


def adamw(params: list, shared: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=shared["lr"], betas=tuple(shared["betas"]),
                             weight_decay=shared["weight_decay"], fused=True)


def peer_update(params: list, optimizer, shared: dict) -> None:
    if shared["clip"] > 0:
        torch.nn.utils.clip_grad_norm_(params, shared["clip"])
    optimizer.step()


def ember_system(shared: dict, grad_cache: bool):
    from engine.model.lora import LoRALinear

    overrides = shared["overrides"] + (["train.grad_cache=true"] if grad_cache else [])
    trainer = build_trainer(overrides)
    encoded = step0_batch(trainer)
    if rows(encoded.queries) != shared["queries"] or rows(encoded.docs) != shared["docs"]:
        raise SystemExit("error: Ember's step-0 batch differs from the prepared one (same config, same seed)")
    with torch.no_grad():
        for name, module in trainer.model.named_modules():
            if isinstance(module, LoRALinear):
                a, b = shared["lora"][lora_key(name)]
                module.lora_A.copy_(a)
                module.lora_B.copy_(b)

    def step() -> float:
        trainer.step = 0  # the same batch every time, as the peers
        return trainer.train_step()["loss"]

    return step, shared["real_tokens"]


def st_system(shared: dict, cached: bool):
    from peft import get_peft_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    path = shared["model_path"]
    transformer = Transformer(path, model_kwargs={"dtype": torch.float32})
    # ST's add_adapter needs peft >= 0.22; wrapping the inner model is what it would do.
    transformer.model = get_peft_model(transformer.model, peft_config(shared))
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                device="cpu")
    load_peft_lora(transformer.model, shared)
    model.train()
    scale = 1.0 / shared["temperature"]
    if cached:
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=shared["chunk"])
    else:
        loss_fn = MultipleNegativesRankingLoss(model, scale=scale)
    if tuple(loss_fn.directions) != ("query_to_doc",) or loss_fn.hardness_mode is not None:
        raise SystemExit(f"error: {type(loss_fn).__name__} has extra terms on: directions {loss_fn.directions}, "
                         f"hardness_mode {loss_fn.hardness_mode}")
    g = shared["group_size"]
    columns = [shared["queries"]] + [shared["docs"][k::g] for k in range(g)]  # anchors, positives, negatives
    features = [pad(c) for c in columns]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, shared)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn([dict(f) for f in features], None)  # fresh dicts: modules write outputs into them
        loss.backward()
        peer_update(params, optimizer, shared)
        return loss.item()

    if cached:
        padded = sum(padded_tokens(c, shared["chunk"]) for c in columns)
    else:  # anchors alone; the candidate columns merged into one forward at their common width
        padded = padded_tokens(columns[0]) + len(shared["docs"]) * max(len(r) for r in shared["docs"])
    return step, padded


def hf_peft_system(shared: dict):
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(shared["model_path"], dtype=torch.float32), peft_config(shared))
    load_peft_lora(model, shared)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, shared)
    towers = [pad(shared["queries"]), pad(shared["docs"])]
    g, temperature = shared["group_size"], shared["temperature"]

    def embed(tower):
        hidden = model(**tower).last_hidden_state
        mask = tower["attention_mask"][..., None].to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        q, d = (embed(t) for t in towers)
        logits = q @ d.T / temperature  # every document of the batch is a candidate
        loss = F.cross_entropy(logits, torch.arange(q.shape[0]) * g)  # query i's positive: document i*G
        loss.backward()
        peer_update(params, optimizer, shared)
        return loss.item()

    return step, sum(padded_tokens(c) for c in (shared["queries"], shared["docs"]))


def build_system(name: str, shared: dict):
    if name in ("ember", "ember_grad_cache"):
        return ember_system(shared, grad_cache=name == "ember_grad_cache")
    if name in ("st_mnrl", "st_cached_mnrl"):
        return st_system(shared, cached=name == "st_cached_mnrl")
    return hf_peft_system(shared)


def run_system(case: dict) -> dict:
    """Build one system, take the warm-up step (its loss is the check) and time case['steps'] more."""
    if case["host_memory"]:  # --peers-host-memory: what Ember's Trainer does for itself
        from engine.host_memory import keep_freed_memory

        keep_freed_memory()
    shared = torch.load(case["batch_file"], weights_only=True)
    shared["model_path"] = case["model"]
    step, padded = build_system(case["system"], shared)
    setup_peak = status_bytes("VmHWM:")
    resettable = reset_peak_rss()
    loss = step()
    start = time.perf_counter()
    for _ in range(case["steps"]):
        step()
    seconds = (time.perf_counter() - start) / case["steps"]
    steps_peak = status_bytes("VmHWM:")
    return {**case, "loss": loss, "seconds": seconds, "real_tokens": shared["real_tokens"], "padded_tokens": padded,
            "peak_rss_steps": steps_peak if resettable else None, "peak_rss_process": max(setup_peak, steps_peak),
            "threads": torch.get_num_threads(), "model_flops": shared["model_flops"],
            "block_flops": shared["block_flops"]}


def run_case(case: dict, in_process: bool) -> dict:
    """Run one system in a fresh interpreter; its last stdout line is a JSON result."""
    if in_process:  # tests: every system in this interpreter, so no peak of its own
        return {**run_system(case), "peak_rss_steps": None, "peak_rss_process": None}
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    if case["system"].startswith("ember") or case["host_memory"]:
        request_huge_pages(env)  # Ember's environment, as its launch scripts set it (engine/host_memory.py)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return {**case, "error": (lines or [f"exit code {result.returncode} (killed?)"])[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------


def fastest(runs: list[dict]) -> dict:
    """A system's fastest run of the rounds (a failed run stands for the system), with every run's s/step
    and the largest peaks of them all."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    best = min(runs, key=lambda r: r["seconds"])
    peaks = {key: max((r[key] for r in runs if r[key] is not None), default=None)
             for key in ("peak_rss_steps", "peak_rss_process")}
    return {**best, **peaks, "seconds_per_round": [r["seconds"] for r in runs]}


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def loss_failure(results: list[dict]) -> str | None:
    """Why the losses disagree with the reference (the first system that ran), or None."""
    done = [r for r in results if "error" not in r]
    bad = [f"{r['system']} {r['loss']:.6f}" for r in done if abs(r["loss"] - done[0]["loss"]) > LOSS_TOLERANCE]
    if not bad:
        return None
    ref = done[0]
    return (f"equal-loss check failed at {ref['mix']} batch {ref['batch']}: {', '.join(bad)} against "
            f"{ref['system']} {ref['loss']:.6f} (tolerance {LOSS_TOLERANCE})")


def print_losses(results: list[dict]) -> None:
    done = [r for r in results if "error" not in r]
    if not done:
        return
    print(f"  equal-loss check, the same batch and LoRA weights before any update (reference {done[0]['system']}, "
          f"tolerance {LOSS_TOLERANCE}):")
    for r in done:
        print(f"    {r['system']:<16} loss {r['loss']:.6f}   |diff| {abs(r['loss'] - done[0]['loss']):.1e}")


def print_table(results: list[dict], peak: float | None) -> None:
    ember_s = {(r["mix"], r["batch"]): r["seconds"] for r in results if r["system"] == "ember" and "error" not in r}
    print("| mix | batch | system | s/step | real tokens/s | Ember tokens/s ÷ this | padded / real tokens | "
          "peak RSS (steps) | peak RSS (process) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        head = f"| {r['mix']} | {r['batch']} | {r['system']} |"
        if "error" in r:
            print(f"{head} failed: {r['error']} | | | | | |")
            continue
        ref = ember_s.get((r["mix"], r["batch"]))
        ratio = f"{r['seconds'] / ref:.2f}x" if ref else "-"
        print(f"{head} {r['seconds']:.3f} | {r['real_tokens'] / r['seconds']:,.0f} | {ratio} | "
              f"{r['padded_tokens'] / r['real_tokens']:.2f} | {mib(r['peak_rss_steps'])} | "
              f"{mib(r['peak_rss_process'])} |")
    for r in results:
        if r["system"].startswith("ember") and "error" not in r:
            # MFU's count (bench/train_step.py step_flops); in brackets the blocks' frozen matmuls alone.
            gflops, block = (r[key] / r["seconds"] / 1e9 for key in ("model_flops", "block_flops"))
            share = "" if peak is None else f" = {gflops / peak:.2f} of the fp32 matmul peak ({block / peak:.2f} 4 N T)"
            print(f"{r['system']} at {r['mix']} batch {r['batch']}: model FLOP/s {gflops:.1f} GFLOP/s{share}")


# ---- command line -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixes", nargs="+", choices=["faq", "long"], default=["faq", "long"])
    parser.add_argument("--batches-faq", type=int, nargs="+", default=[16, 32], help="queries per step, faq mix")
    parser.add_argument("--batches-long", type=int, nargs="+", default=[2, 4], help="queries per step, long mix")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, in turn, and keep each one's fastest run")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS)
    parser.add_argument("--model", default=os.path.join(REPO, ".cache", "ember", "smollm2-135m-instruct"),
                        help="a Hugging Face folder (weights and tokenizer)")
    parser.add_argument("--data", default=os.path.join(REPO, ".cache", "ember", "demo", "train.jsonl"),
                        help="FAQ-style JSONL (query, pos, neg): the faq mix, and the long mix's source")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra Ember config override, e.g. task.query_instruction=find (repeatable)")
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "bench", "peers"),
                        help="folder for the shared batches, the long data and Ember's run folder")
    parser.add_argument("--out", help="also write every result to this JSON file")
    parser.add_argument("--in-process", action="store_true",
                        help="every system in this interpreter (tests: faster; no peak RSS per system, no matmul peak)")
    parser.add_argument("--peers-host-memory", action="store_true",
                        help="run the peers with Ember's host-memory settings too (engine/host_memory.py: malloc "
                             "keeps freed memory, torch's allocator on huge pages); by default each system runs as "
                             "its users run it, the peers with torch's defaults")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one system, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_system(json.loads(args.case))))
        return
    if args.steps < 1:
        sys.exit("error: --steps must be at least 1 (the timed steps after the warm-up)")
    if args.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    for path, what in ((args.model, "--model"), (args.data, "--data")):
        if not os.path.exists(path):
            sys.exit(f"error: {what} {path} does not exist (the demo assets: python launch/prepare_demo.py)")
    os.makedirs(args.work, exist_ok=True)

    from bench.train_step import matmul_peak_gflops

    peak = None if args.in_process else matmul_peak_gflops()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak: {'not measured (--in-process)' if peak is None else f'{peak:.1f} GFLOP/s'}")
    results = []
    for mix in args.mixes:
        batches = args.batches_faq if mix == "faq" else args.batches_long
        data = args.data
        if mix == "long":
            data = write_long_data(args.data, args.model, os.path.join(args.work, "long.jsonl"),
                                   lines=max(64, *batches))
        for batch in batches:
            batch_file = prepare(args, mix, batch, data)
            shared = torch.load(batch_file, weights_only=True)
            print(f"{mix}, batch {batch}: {batch} queries x (1 positive + {shared['group_size'] - 1} hard negative), "
                  f"{shared['real_tokens']} real tokens")
            runs: dict[str, list[dict]] = {system: [] for system in args.systems}
            for round_index in range(args.rounds):  # round-robin: a slow spell of the machine hits every system
                for system in args.systems:
                    case = dict(system=system, mix=mix, batch=batch, batch_file=batch_file, model=args.model,
                                steps=args.steps, host_memory=args.peers_host_memory)
                    r = run_case(case, args.in_process)
                    runs[system].append(r)
                    label = f"  {system}" + (f" (round {round_index + 1})" if args.rounds > 1 else "")
                    print(f"{label}: " + (f"failed: {r['error']}" if "error" in r else
                                          f"{r['seconds']:.3f} s/step, loss {r['loss']:.6f}"), flush=True)
                    failure = loss_failure([rs[-1] for rs in runs.values() if rs])
                    if failure:
                        print_losses([rs[-1] for rs in runs.values() if rs])
                        sys.exit(f"error: {failure}")
            case_results = [fastest(runs[system]) for system in args.systems]
            print_losses(case_results)
            results += case_results
    print()
    print_table(results, peak)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": {"cores": os.cpu_count(), "torch": torch.__version__,
                                   "threads": torch.get_num_threads(), "matmul_peak_gflops": peak},
                       "results": results}, f, indent=1)
    failed = [f"{r['mix']}/{r['batch']}/{r['system']}" for r in results if "error" in r]
    if failed:
        sys.exit(f"error: {len(failed)} case(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
