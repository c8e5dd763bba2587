"""Memory and communication of sequence parallelism (Ulysses, ring) in one long-context training step.

    python bench/long_context.py                  # 8K, 16K, 32K tokens x degree 1, 2, 4 x ring, Ulysses
    python bench/long_context.py --tokens 512 --degrees 1 2 --hidden 64 --json out.json   # a quick look

Each configuration (tokens, scheme, degree) runs in fresh processes, one per rank
(torch.multiprocessing, gloo on CPU), so that every rank's resident-memory high-water mark
belongs to that configuration alone. Every rank builds the same small random Llama through the
engine (compose + build_task_model) and parallelize()s it with parallel.ring or parallel.ulysses
= degree (which installs context parallelism and FSDP2 over the same ranks), then runs a warm-up
step on a short batch (FSDP's lazy init, AdamW's state, thread pools) and measures one training
step -- forward and backward of the embedding task, then AdamW -- on one batch that every rank
passes whole: one query, one long document of `tokens` tokens and one short hard negative. The
model splits every sequence over the ranks itself (engine/parallel/context.py).

Measured on each rank, for that step:
- saved for backward: the bytes of the tensors autograd keeps from the forward pass for the
  backward pass (torch.autograd.graph.saved_tensors_hooks), each storage once, parameters left
  out (they are not activations). This is the per-rank activation memory the 1/degree ideal,
  and issue 4's rule "at degree 4 at most 0.35 of degree 1", are about.
- peak tensor memory: the highest sum of live CPU tensor bytes during the step above what was
  live at its start (the profiler's allocation events, torch.profiler profile_memory=True): the
  CPU counterpart of torch.cuda.max_memory_allocated() - memory_allocated().
- peak RSS growth: the process's resident-set high-water mark after the step (getrusage
  ru_maxrss) minus its resident set just before it (after malloc_trim): what the OS saw,
  allocator slack and the gloo buffers included.
- bytes sent: every byte this rank sends. Ulysses: the all-to-alls, counted by bench/comm.py's
  collective counter; ring: the point-to-point transfers, counted by wrapping
  engine.parallel.ring._pass_round, through which all of ring attention's traffic goes. Other
  collectives (FSDP2's parameter all-gathers and gradient reduce-scatters, the pooled vectors'
  all-reduce over the context-parallel group) are reported apart.

Analytic volumes per transformer layer, for a forward pass whose ring-local stream holds n
tokens (each sequence padded to a multiple of C chunks, C = 2R causal zigzag, else R; then one
filler sequence so n divides by U; see engine/parallel/context.py), Hq query heads, Hkv KV heads,
head size D and b bytes per element, per rank:
  Ulysses (degree U, ring 1): 4 all-to-alls forward (q, k, v, output), each sending (U-1)/U of
    this rank's n/U-token tensor; KV heads fewer than U are first repeated to U heads:
      forward = backward = (U-1)/U * (n/U) * D * (2 Hq + 2 max(Hkv, U)) * b
  ring (degree R, Ulysses 1), as engine/parallel/ring.py implements it: the K/V block passes
    R-1 times forward; backward K/V pass R-1 times again and the float32 dK/dV accumulators R times:
      forward  = (R-1) * 2 * n * Hkv * D * b
      backward = (R-1) * 2 * n * Hkv * D * b + R * 2 * n * Hkv * D * 4
The step's volume is layers x the sum over its forward passes (the query tower and the document
tower) of forward + backward.

The script exits 1 unless every rank sends exactly the analytic volume, a dispatcher-level count
of c10d ops finds no traffic outside the counters, every rank's loss equals one process's
(relative 1e-5: the same step was measured), and the degree-4 rule holds.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.comm import CommCounter, DispatchedCollectives  # noqa: E402
from engine.cli import compose  # noqa: E402
from engine.data.batch import EmbeddingBatch, PackedSequences  # noqa: E402
from engine.parallel import ring as ring_module  # noqa: E402
from engine.parallel.layout import Layout, check_model_fits_layout  # noqa: E402
from engine.parallel.mesh import init_mesh  # noqa: E402
from engine.parallel.parallelize import parallelize  # noqa: E402
from engine.parallel.spawn import spawn_ranks  # noqa: E402
from engine.build import build_task_model, load_tokenizer, model_args  # noqa: E402

MiB = 1024**2
SHORT = 64  # tokens of the query and of the hard negative


@dataclass(frozen=True)
class Setup:
    """One configuration: `tokens` in the long document, split over `degree` ranks by `scheme`."""

    tokens: int
    scheme: str  # "ring" | "ulysses" ("none" at degree 1)
    degree: int

    @property
    def layout(self) -> Layout:
        return Layout(ring=self.degree if self.scheme == "ring" else 1,
                      ulysses=self.degree if self.scheme == "ulysses" else 1)


# ---- the workload ---------------------------------------------------------------------------------


def overrides(args, layout: Layout) -> list[str]:
    return [
        "model.family=llama", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}", f"model.num_kv_heads={args.kv_heads}",
        f"model.intermediate_size={3 * args.hidden}", "model.causal=true",
        # Temperature 1: a loss far from 0, so its agreement with one process means something.
        "task=embedding", "task.pooling=mean", "task.num_negatives=1", "task.temperature=1.0",
        f"parallel.ring={layout.ring}", f"parallel.ulysses={layout.ulysses}", "train.recompute=none",
    ]


def long_batch(tokens: int, vocab: int, seed: int = 0) -> EmbeddingBatch:
    """One query, its positive (the long document of `tokens` tokens) and one short hard negative."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=generator).tolist()

    return EmbeddingBatch(queries=PackedSequences.from_token_lists([ids(SHORT)]),
                          docs=PackedSequences.from_token_lists([ids(tokens), ids(SHORT)]), group_size=2)


def pass_lengths(tokens: int) -> list[list[int]]:
    """The sequence lengths of the step's forward passes: the query tower, then the document tower."""
    return [[SHORT], [tokens, SHORT]]


def training_step(task: nn.Module, optimizer: torch.optim.Optimizer, batch: EmbeddingBatch) -> float:
    loss = task(batch)
    loss.backward()
    optimizer.step()
    return loss.item()


# ---- what one rank measures ------------------------------------------------------------------------


def _is_parameter(t: Tensor) -> bool:
    """A parameter, or a view of one (a linear saves weight.t()); FSDP2's unsharded parameters too."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class SavedForBackward:
    """Bytes of the tensors autograd saves for backward while the `with` is open, each storage once."""

    def __init__(self):
        self.storages: dict[int, int] = {}  # storage address -> bytes
        self.parameter_bytes = 0  # saved by reference, not activations
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if _is_parameter(t):
            self.parameter_bytes += t.numel() * t.element_size()
        else:
            # A saved tensor keeps its storage alive until backward, so an address names one storage.
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class RingTraffic:
    """Bytes this rank sends through ring attention's one point-to-point function, by pass."""

    def __init__(self):
        self.bytes = {"forward": 0, "backward": 0}
        self.messages = 0  # tensors sent (each also received once)
        self._original = None

    def __enter__(self):
        self._original = original = ring_module._pass_round

        def counted(tensors, group):
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            self.bytes[phase] += sum(t.numel() * t.element_size() for t in tensors)
            self.messages += len(tensors)
            return original(tensors, group)

        ring_module._pass_round = counted
        return self

    def __exit__(self, *exc):
        ring_module._pass_round = self._original


def peak_live_bytes(prof) -> int:
    """Highest running sum of the CPU allocator's allocations minus frees, from the profiler's events."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


def resident_bytes() -> int:
    """The resident set now (Linux /proc; ru_maxrss elsewhere, an upper bound)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_resident_bytes()


def max_resident_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS so the resident set before the step is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the RSS baseline may include free heap


def build(args, setup: Setup):
    """The task model on this rank, parallelized for the setup's layout, and its optimizer."""
    cfg, _ = compose(overrides(args, setup.layout))  # no data files: the batch is made here
    layout, device = setup.layout, torch.device("cpu")
    check_model_fits_layout(model_args(cfg.model), layout)
    mesh = init_mesh(layout, device)
    task = build_task_model(cfg, device, load_tokenizer(cfg.model))
    if layout.world_size > 1:
        parallelize(task, mesh, sequence_parallel=True)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    return task, optimizer, mesh, cfg.model.vocab_size


def measure(args, setup: Setup) -> dict:
    """Build the model on this rank, warm up, and measure one training step."""
    task, optimizer, mesh, vocab = build(args, setup)
    training_step(task, optimizer, long_batch(args.warmup_tokens, vocab, seed=1))

    batch = long_batch(setup.tokens, vocab)
    optimizer.zero_grad(set_to_none=True)
    release_free_memory()
    rss_before, max_rss_before = resident_bytes(), max_resident_bytes()
    groups = {dim: mesh.group(dim) for dim in ("ulysses", "ring", "cp", "dp_sp")} if mesh.distributed else {}
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with SavedForBackward() as saved, RingTraffic() as ring, CommCounter(task, groups) as comm, \
            DispatchedCollectives() as seen, profile as prof:
        start = time.perf_counter()
        loss = training_step(task, optimizer, batch)
        seconds = time.perf_counter() - start
    max_rss_after = max_resident_bytes()
    return {
        "rank": mesh.rank, "loss": loss, "seconds": seconds, "threads": torch.get_num_threads(),
        "saved_bytes": saved.bytes, "saved_parameter_bytes": saved.parameter_bytes,
        "peak_tensor_bytes": peak_live_bytes(prof),
        "rss_growth_bytes": max_rss_after - rss_before, "rss_peak_in_step": max_rss_after > max_rss_before,
        "ring_bytes": ring.bytes, **collective_bytes(comm),
        # Each ring message is a send and a receive at the dispatcher.
        "calls_counted": sum(row[0] for row in comm.rows.values()) + 2 * ring.messages, "calls_seen": seen.calls,
    }


def collective_bytes(comm: CommCounter) -> dict:
    """The all-to-alls (Ulysses) by pass; every other collective (FSDP2, pooled sums) by kind."""
    all_to_all = {"forward": 0.0, "backward": 0.0}
    other: dict[str, float] = {}
    for (_, _, _, phase, op), (_, _, _, sent) in comm.rows.items():
        if op == "all-to-all":
            all_to_all[phase] += sent
        else:
            other[op] = other.get(op, 0.0) + sent
    return {"ulysses_bytes": all_to_all, "other_bytes": other}


def _measure_rank(rank: int, world: int, args, setup: Setup) -> dict:
    return measure(args, setup)


def run(args, setup: Setup) -> list[dict]:
    """The configuration on `degree` fresh processes (the machine's cores shared); results in rank order."""
    return spawn_ranks(_measure_rank, setup.degree, args, setup, timeout_s=args.timeout, threads=None)


# ---- analytic volumes -----------------------------------------------------------------------------


def ring_local_tokens(lengths: list[int], ring: int, ulysses: int, causal: bool = True) -> int:
    """n: tokens of one ring rank's stream (context.py: per-sequence padding to C chunks, then a filler to U)."""
    chunks = 2 * ring if causal and ring > 1 else ring
    n = sum(math.ceil(length / chunks) * chunks for length in lengths) // ring
    filler = -n % ulysses
    if filler % 2 and causal and ring > 1:
        filler += ulysses  # zigzag keeps every local sequence even
    return n + filler


def ulysses_layer_bytes(n: int, ulysses: int, q_heads: int, kv_heads: int, head_dim: int, b: int) -> float:
    """Per rank, one layer, one direction: q, k, v and the output, each (U-1)/U of the rank's n/U tokens."""
    kv_sent = kv_heads if kv_heads >= ulysses else ulysses  # fewer KV heads than U are repeated first
    return (ulysses - 1) / ulysses * (n / ulysses) * head_dim * (2 * q_heads + 2 * kv_sent) * b


def ring_layer_bytes(n: int, ring: int, kv_heads: int, head_dim: int, b: int) -> tuple[float, float]:
    """Per rank, one layer: (forward, backward); dK/dV accumulators travel in float32."""
    block = 2 * n * kv_heads * head_dim  # K and V elements of one rank's block
    return (ring - 1) * block * b, (ring - 1) * block * b + ring * block * 4


def analytic_bytes(args, setup: Setup, element_bytes: int = 4) -> dict:
    """Bytes one rank sends in the step by the formulas above: {"forward": ..., "backward": ...}."""
    head_dim = args.hidden // args.heads
    forward = backward = 0.0
    for lengths in pass_lengths(setup.tokens):
        layout = setup.layout
        n = ring_local_tokens(lengths, layout.ring, layout.ulysses)
        if setup.scheme == "ulysses":
            f = b = ulysses_layer_bytes(n, setup.degree, args.heads, args.kv_heads, head_dim, element_bytes)
        else:
            f, b = ring_layer_bytes(n, setup.degree, args.kv_heads, head_dim, element_bytes)
        forward += args.layers * f
        backward += args.layers * b
    return {"forward": forward, "backward": backward}


# ---- the report ---------------------------------------------------------------------------------


def summarize(args, setup: Setup, ranks: list[dict], base: dict | None) -> dict:
    """Worst rank's memory, its ratio to degree 1 (base), and the traffic beside the analytic volume."""
    row = {"tokens": setup.tokens, "scheme": setup.scheme, "degree": setup.degree, "ranks": ranks,
           "seconds": max(r["seconds"] for r in ranks), "threads_per_rank": ranks[0]["threads"],
           "loss": ranks[0]["loss"]}
    for key in ("saved_bytes", "peak_tensor_bytes", "rss_growth_bytes"):
        row[key] = max(r[key] for r in ranks)
        row[key.replace("_bytes", "_ratio")] = row[key] / base[key] if base else 1.0
    row["ideal_ratio"] = 1 / setup.degree
    if setup.degree > 1:
        sent_key = "ring_bytes" if setup.scheme == "ring" else "ulysses_bytes"
        sent = [r[sent_key] for r in ranks]
        analytic = analytic_bytes(args, setup)
        total = analytic["forward"] + analytic["backward"]
        row.update(sent_forward=sent[0]["forward"], sent_backward=sent[0]["backward"],
                   analytic_forward=analytic["forward"], analytic_backward=analytic["backward"],
                   sent_ratio=(sent[0]["forward"] + sent[0]["backward"]) / total,
                   ranks_agree=all(s == sent[0] for s in sent),
                   # The same step as one process (float32 reduction order aside), or the numbers mean little.
                   loss_matches=all(math.isclose(r["loss"], base["loss"], rel_tol=1e-5) for r in ranks),
                   other_bytes=ranks[0]["other_bytes"],
                   counting_complete=all(r["calls_counted"] == r["calls_seen"] for r in ranks))
    return row


def print_memory(rows: list[dict]) -> None:
    print("\nper-rank memory of one training step (worst rank; ratio = this / degree 1 at the same tokens)")
    print(f"{'tokens':>6} {'scheme':<8} {'deg':>3} {'ideal':>6} | {'saved for bwd MiB':>17} {'ratio':>6} | "
          f"{'peak tensors MiB':>16} {'ratio':>6} | {'peak RSS growth MiB':>19} {'ratio':>6} | {'s/step':>6} | loss")
    for r in rows:
        print(f"{r['tokens']:>6} {r['scheme']:<8} {r['degree']:>3} {r['ideal_ratio']:>6.3f} | "
              f"{r['saved_bytes'] / MiB:>17.1f} {r['saved_ratio']:>6.3f} | "
              f"{r['peak_tensor_bytes'] / MiB:>16.1f} {r['peak_tensor_ratio']:>6.3f} | "
              f"{r['rss_growth_bytes'] / MiB:>19.1f} {r['rss_growth_ratio']:>6.3f} | {r['seconds']:>6.1f} | "
              f"{r['loss']:.6f}")


def print_traffic(rows: list[dict]) -> None:
    print("\nbytes each rank sends in the step: measured / analytic (MiB)")
    print(f"{'tokens':>6} {'scheme':<8} {'deg':>3} | {'forward':>19} | {'backward':>19} | {'ratio':>6} | "
          f"{'ranks agree':>11} | other collectives (MiB)")
    for r in rows:
        if r["degree"] == 1:
            continue
        other = ", ".join(f"{op} {b / MiB:.2f}" for op, b in sorted(r["other_bytes"].items())) or "none"
        print(f"{r['tokens']:>6} {r['scheme']:<8} {r['degree']:>3} | "
              f"{r['sent_forward'] / MiB:>8.2f} / {r['analytic_forward'] / MiB:>8.2f} | "
              f"{r['sent_backward'] / MiB:>8.2f} / {r['analytic_backward'] / MiB:>8.2f} | {r['sent_ratio']:>6.3f} | "
              f"{'yes' if r['ranks_agree'] else 'NO':>11} | {other}")


def verdict(rows: list[dict], rule: float) -> tuple[bool, str]:
    """Issue 4's rule on degree 4 and the traffic checks, as one line."""
    notes, ok = [], True
    for r in rows:
        if r["degree"] == 4:
            passed = r["saved_ratio"] <= rule
            ok &= passed
            notes.append(f"{r['scheme']} {r['tokens']} {r['saved_ratio']:.3f}{'' if passed else ' FAIL'}")
    traffic = [r for r in rows if r["degree"] > 1]
    exact = all(abs(r["sent_ratio"] - 1) < 1e-9 and r["ranks_agree"] for r in traffic)
    complete = all(r["counting_complete"] for r in traffic)
    same_loss = all(r["loss_matches"] for r in traffic)
    ok &= exact and complete and same_loss
    line = (f"summary: saved-for-backward at degree 4 / degree 1 (rule <= {rule}): {', '.join(notes) or 'n/a'}; "
            f"traffic {'equals' if exact else 'DIFFERS FROM'} the analytic volume on every rank; "
            f"counting {'complete' if complete else 'INCOMPLETE'}; "
            f"losses {'equal' if same_loss else 'DIFFER FROM'} one process's")
    return ok, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768],
                        help="tokens of the long document")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4], help="sequence-parallel degrees")
    parser.add_argument("--schemes", choices=["ring", "ulysses"], nargs="+", default=["ring", "ulysses"])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--warmup-tokens", type=int, default=256, help="the warm-up step's long document")
    parser.add_argument("--rule", type=float, default=0.35, help="largest saved-for-backward ratio at degree 4")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a rank may wait in a collective")
    parser.add_argument("--json", help="also write every configuration's results (every rank) to this file")
    args = parser.parse_args(argv)
    if 1 not in args.degrees:
        parser.error("--degrees: include 1, the baseline every ratio is taken against")

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, gloo on CPU; model: llama, hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, fp32; step: "
          f"1 query ({SHORT}) + long document + 1 negative ({SHORT}), forward + backward + AdamW")
    rows = []
    for tokens in args.tokens:
        base = summarize(args, Setup(tokens, "none", 1), run(args, Setup(tokens, "none", 1)), None)
        rows.append(base)
        for scheme in args.schemes:
            for degree in sorted(d for d in args.degrees if d > 1):
                setup = Setup(tokens, scheme, degree)
                rows.append(summarize(args, setup, run(args, setup), base))
                print(f"  done: {tokens} tokens, {scheme} {degree} ({rows[-1]['seconds']:.1f} s/step)", flush=True)
    print_memory(rows)
    print_traffic(rows)
    ok, line = verdict(rows, args.rule)
    print("\n" + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
