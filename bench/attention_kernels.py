"""The attention section of bench/kernel_bench.py: back-ends on one GPU, time, TFLOP/s and peak memory of
forward and forward + backward.

    python bench/kernel_bench.py --what attention                  # 4K..32K tokens, Hq 32, Hkv 8, D 128, bf16, causal
    python bench/kernel_bench.py --what attention --tokens 8192 --seqs 4 --bidirectional --backends triton sdpa
    TRITON_INTERPRET=1 python bench/kernel_bench.py --what attention --device cpu --tokens 64 --q-heads 4 \
        --kv-heads 2 --head-dim 16 --dtype float32    # the code path on CPU at a toy size (the GPU check's dry run)

Each row packs --seqs equal sequences into one varlen stream of --tokens tokens and runs it through
kernels.attention's dispatcher by name: triton (engine/kernels/attention/triton.py, autotuned; the first
call per shape tunes and is excluded by the warm-up), flash_attn (when installed), sdpa (PyTorch's
scaled_dot_product_attention per length bucket, reference.py) and naive (explicit fp32 scores,
reference.py's return_lse path: O(L^2) memory, skipped past --naive-max tokens per sequence).

FLOPs are the usual attention count: forward 4 * Lq * Lk * Hq * D per sequence (two matrix
products), halved under causal masking; backward 2.5x the forward (five products against two),
so forward + backward = 3.5x. Memory is the peak allocated during the call above what the inputs
already hold. After each length a `figure:` line sums up forward + backward per backend and the
Triton/SDPA time ratio (bench/gpu/check.sh copies these lines into its summary). On a machine
without CUDA the script says so and exits unless given --device cpu, which runs the same code
at a toy size with wall-clock times and no memory figures: absolute GPU figures are only quoted
when measured on a GPU (docs/performance.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from engine.kernels.attention import attention  # noqa: E402
from engine.kernels.attention.dispatch import _installed  # noqa: E402

BACKENDS = ("triton", "flash_attn", "sdpa", "naive")


def attention_flops(seq_len: int, num_seqs: int, q_heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention over num_seqs sequences of seq_len tokens."""
    flops = 4.0 * seq_len * seq_len * q_heads * head_dim * num_seqs
    return flops / 2 if causal else flops


def run_attention_backend(name: str, q, k, v, cu, max_seqlen: int, causal: bool, backward: bool):
    """One call of backend `name` (and its backward when asked)."""
    if name == "naive":  # reference.py's explicit-scores path: the O(L^2) baseline
        out, _ = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, causal=causal, backend="torch",
                           return_lse=True)
    else:
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, causal=causal, backend=name)
    if backward:
        out.backward(torch.ones_like(out))
    return out


def measure(fn, repeats: int, device: torch.device) -> tuple[float, int | None]:
    """(milliseconds per call, peak bytes allocated above the state before the timed calls; None on CPU)."""
    fn()  # warm-up: compilation and autotuning
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, torch.cuda.max_memory_allocated() - base


def attention_section(args) -> list[dict]:
    """The attention rows of the kernel benchmark; prints a table and returns the rows."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("attention kernels: needs a CUDA GPU (none here); the Triton kernels' CPU tests run under "
              "TRITON_INTERPRET=1 in tests/kernels/test_attention_triton.py, and --device cpu runs this "
              "section's code at a toy size")
        return []
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    causal = not args.bidirectional
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (code path only: not GPU figures)"
    shape = (f"Hq {args.q_heads}, Hkv {args.kv_heads}, D {args.head_dim}, {args.dtype}, "
             f"{'causal' if causal else 'bidirectional'}, {args.seqs} seq(s) per stream")
    print(f"attention kernels on {card}: {shape}")
    print(f"{'tokens':>7} {'backend':>10} {'fwd ms':>8} {'fwd TF/s':>9} {'fwd MiB':>8} {'f+b ms':>8} "
          f"{'f+b TF/s':>9} {'f+b MiB':>8}")
    rows = []
    for tokens in args.tokens:
        seq_len = tokens // args.seqs
        cu = torch.arange(0, args.seqs + 1, device=device, dtype=torch.int32) * seq_len
        generator = torch.Generator(device=device).manual_seed(0)
        make = lambda heads: torch.randn(seq_len * args.seqs, heads, args.head_dim, device=device, dtype=dtype,
                                         generator=generator)
        q, k, v = make(args.q_heads), make(args.kv_heads), make(args.kv_heads)
        forward_flops = attention_flops(seq_len, args.seqs, args.q_heads, args.head_dim, causal)
        measured, skipped = {}, {}
        for name in args.backends:
            reason = skip_reason(name, seq_len, args.naive_max, device)
            if reason:
                print(f"{tokens:>7} {name:>10}  ({reason})")
                skipped[name] = reason
                continue
            row = {"tokens": tokens, "backend": name}
            try:
                with torch.no_grad():
                    ms, peak = measure(lambda: run_attention_backend(name, q, k, v, cu, seq_len, causal, False),
                                       args.repeats or 5, device)
                row.update(fwd_ms=ms, fwd_tflops=forward_flops / ms / 1e9, fwd_mib=mib(peak))
                leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
                ms, peak = measure(lambda: run_attention_backend(name, *leaves, cu, seq_len, causal, True),
                                   args.repeats or 5, device)
                row.update(fb_ms=ms, fb_tflops=3.5 * forward_flops / ms / 1e9, fb_mib=mib(peak))
            except torch.OutOfMemoryError:
                print(f"{tokens:>7} {name:>10}  (out of memory)")
                skipped[name] = "out of memory"
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            measured[name] = row
            print(f"{tokens:>7} {name:>10} {row['fwd_ms']:>8.2f} {row['fwd_tflops']:>9.1f} {row['fwd_mib']:>8} "
                  f"{row['fb_ms']:>8.2f} {row['fb_tflops']:>9.1f} {row['fb_mib']:>8}")
        print(attention_figure(tokens, shape, card, measured, skipped))
        sys.stdout.flush()
    return rows


def skip_reason(name: str, seq_len: int, naive_max: int, device: torch.device) -> str | None:
    """Why backend `name` cannot run this row here, or None."""
    if name == "flash_attn" and not _installed("flash_attn"):
        return "flash-attn is not installed"
    if name == "flash_attn" and device.type != "cuda":
        return "flash-attn needs CUDA"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton on CPU needs TRITON_INTERPRET=1"
    if name == "naive" and seq_len > naive_max:
        return f"{seq_len}^2 scores per head, above --naive-max"
    return None


def mib(peak: int | None) -> str:
    return "-" if peak is None else f"{peak / 2**20:.0f}"


def attention_figure(tokens: int, shape: str, card: str, measured: dict, skipped: dict) -> str:
    """One line per length for bench/gpu/check.sh's summary: forward + backward of each backend, and
    Triton's time over SDPA's (below 1: Triton is faster)."""
    parts = [f"{name} {row['fb_ms']:.2f} ms ({row['fb_tflops']:.1f} TFLOP/s)" for name, row in measured.items()]
    parts += [f"{name} skipped ({reason})" for name, reason in skipped.items()]
    if "triton" in measured and "sdpa" in measured:
        ratio = measured["triton"]["fb_ms"] / measured["sdpa"]["fb_ms"]
        forward = measured["triton"]["fwd_ms"] / measured["sdpa"]["fwd_ms"]
        parts.append(f"triton/sdpa time {ratio:.2f}x (forward alone {forward:.2f}x)")
    return f"figure: attention forward + backward, {tokens} tokens, {shape}, {card}: " + "; ".join(parts)


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    """Attention's options on bench/kernel_bench.py's command line (--repeats is shared with InfoNCE)."""
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--seqs", type=int, default=1, help="equal sequences packed into each stream")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--naive-max", type=int, default=8192, help="longest sequence the naive path runs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: this section's code at a toy size (Triton needs TRITON_INTERPRET=1)")
