"""Kernel benchmarks (issue 5): each kernel against the naive PyTorch it replaces, time and peak memory.

    python bench/kernel_bench.py --what infonce                 # CPU: B = N in 8192..65536, d = 1024
    python bench/kernel_bench.py --what infonce --sizes 8192 --repeats 3
    python bench/kernel_bench.py --what infonce --tiles         # the chunked path's tile-size sweep
    python bench/kernel_bench.py --what infonce --sizes 32768 --methods torch triton   # GPU: the GPU check's row
    python bench/kernel_bench.py --what attention              # GPU: triton vs flash_attn, sdpa, naive
    python bench/kernel_bench.py --what all

Times are wall seconds of one forward + backward (CPU seconds beside them: on a shared
machine they move less with other load). One section per kernel, each a `*_section(args)`
listed in SECTIONS; `--what all` runs them in turn. Every measured case runs in a fresh
interpreter (this script with --case), so one case's allocator state cannot hide or inflate
another's peak.

InfoNCE. Workload: B queries and N = B candidates of width d (float32, unit rows), each
query's positive on the diagonal, temperature 0.05, forward + backward of the mean loss.
  naive    logits = (q / tau) @ k.T; F.cross_entropy(logits, positive)   (three B x N tensors at peak)
  chunked  kernels.infonce.info_nce_loss(..., backend="torch").mean()  (row tiles, engine/kernels/infonce/chunked.py)
  triton   the same with backend="triton" (GPU; on CPU only under TRITON_INTERPRET=1, at toy sizes)
--methods picks among them (default: naive and chunked on CPU, all three on a GPU). On a GPU the
warm-up runs at the measured size, since the Triton kernels autotune per (B, N, d).
Peak memory is the growth of the process's peak RSS (VmHWM, reset just before the step)
over its RSS with the inputs allocated, on CPU; torch.cuda.max_memory_allocated growth
on GPU. A naive case is skipped, and said so, when its B x N tensors would not fit in the
memory the machine has available. After each size a `figure:` line sums up the methods and
Triton's time and memory over the chunked path's (bench/gpu/check.sh copies it into its summary).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from engine.kernels.infonce import chunked as infonce_chunked  # noqa: E402
from engine.kernels.infonce import info_nce_loss  # noqa: E402

from bench.attention_kernels import add_attention_arguments, attention_section  # noqa: E402

# ---- process memory (Linux) ---------------------------------------------------------------------


def status_bytes(key: str) -> int:
    """A /proc/self/status field in bytes: VmRSS (resident now), VmHWM (peak since reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def run_case(case: dict) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is a JSON result."""
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        return {**case, "error": (result.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- InfoNCE ------------------------------------------------------------------------------------

INFONCE_TEMPERATURE = 0.05


def infonce_naive(q, k, positive):
    # Temperature on q, not on the logits: one B x N tensor fewer, the fairest naive path.
    logits = (q / INFONCE_TEMPERATURE) @ k.T  # (B, N)
    return F.cross_entropy(logits, positive)


def infonce_kernel(backend):
    return lambda q, k, positive: info_nce_loss(q, k, positive, temperature=INFONCE_TEMPERATURE,
                                                backend=backend).mean()


def infonce_case(case: dict) -> dict:
    """One forward + backward in this process: seconds and peak memory growth over the inputs."""
    if case.get("tile_elements"):
        infonce_chunked.TILE_ELEMENTS = case["tile_elements"]
    device = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    loss_fn = infonce_naive if case["method"] == "naive" else infonce_kernel(case["method"])
    num, dim = case["size"], case["dim"]

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        q = F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device, dtype).requires_grad_(True)
        k = F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device, dtype).requires_grad_(True)
        return q, k, torch.arange(n, device=device)

    # Warm-up: thread pools, kernel compilation and, on a GPU, autotuning, which is keyed by the size.
    loss_fn(*inputs(num if device.type == "cuda" else min(num, 256))).backward()
    q, k, positive = inputs(num)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = status_bytes("VmRSS:")
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = loss_fn(q, k, positive)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else status_bytes("VmHWM:") - before
    return {**case, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak, "loss": loss.item()}


def infonce_naive_fits(num: int, device: str) -> tuple[bool, float]:
    """Whether three B x N float32 tensors (logits, log-softmax, gradient) fit, and their GiB."""
    need = 3 * num * num * 4
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else available_bytes()
    return need < 0.85 * free, need / 2**30


def infonce_section(args) -> None:
    if args.tiles:
        infonce_tile_sweep(args)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = args.methods or (["naive", "torch", "triton"] if device == "cuda" else ["naive", "torch"])
    run = infonce_case if args.same_process else run_case
    print(f"InfoNCE, {device}, d = {args.dim}, float32, forward + backward, {args.repeats or 1} run(s) per case "
          f"(best time shown), " + ("all in this process" if args.same_process else "each in a fresh process"))
    print(f"{'B = N':>7} | {'method':>7} | {'seconds':>8} | {'CPU s':>7} | {'peak growth':>11} | "
          f"{'vs naive time':>13} | {'vs naive memory':>15}")
    for num in args.sizes:
        rows = {}
        for method in methods:
            if method == "naive":
                fits, need_gib = infonce_naive_fits(num, device)
                if not fits:
                    print(f"{num:>7} | {'naive':>7} | skipped: needs ~{need_gib:.0f} GiB for its B x N tensors, "
                          f"more than this machine has available")
                    continue
            runs = [run(dict(kernel="infonce", method=method, size=num, dim=args.dim, dtype="float32",
                             device=device)) for _ in range(args.repeats or 1)]
            good = [r for r in runs if "error" in r] or [min(runs, key=lambda r: r["seconds"])]
            rows[method] = good[0]
        for method, r in rows.items():
            if "error" in r:
                print(f"{num:>7} | {method:>7} | failed: {r['error']}")
                continue
            naive = rows.get("naive")
            ratio_t = ratio_m = "-"
            if method != "naive" and naive and "error" not in naive:
                ratio_t = f"{r['seconds'] / naive['seconds']:.2f}x"
                ratio_m = f"{r['peak_bytes'] / naive['peak_bytes']:.3f}x"
            print(f"{num:>7} | {method:>7} | {r['seconds']:>8.2f} | {r['cpu_seconds']:>7.1f} | "
                  f"{r['peak_bytes'] / 2**20:>7.0f} MiB | {ratio_t:>13} | {ratio_m:>15}")
        print(infonce_figure(num, args.dim, device, rows))
        sys.stdout.flush()


INFONCE_NAMES = {"naive": "naive", "torch": "chunked", "triton": "triton"}


def infonce_figure(num: int, dim: int, device: str, rows: dict) -> str:
    """One line per size for bench/gpu/check.sh's summary: each method's time and peak growth, and
    Triton's over the chunked path's (below 1: Triton is faster / smaller)."""
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    parts = []
    for method, r in rows.items():
        name = INFONCE_NAMES[method]
        parts.append(f"{name} failed: {r['error']}" if "error" in r else
                     f"{name} {r['seconds'] * 1e3:.1f} ms, peak +{r['peak_bytes'] / 2**20:.0f} MiB")
    good = {m: r for m, r in rows.items() if "error" not in r}
    if "triton" in good and "torch" in good:
        triton, chunked = good["triton"], good["torch"]
        memory = f"{triton['peak_bytes'] / chunked['peak_bytes']:.2f}x" if chunked["peak_bytes"] > 0 else "n/a"
        parts.append(f"triton/chunked time {triton['seconds'] / chunked['seconds']:.2f}x, memory {memory}")
    return (f"figure: InfoNCE forward + backward, B = N = {num}, d = {dim}, float32, {card}: "
            + "; ".join(parts))


def infonce_tile_sweep(args) -> None:
    """The chunked path's time and memory against its tile size (TILE_ELEMENTS), at args.sizes[0]."""
    num = args.sizes[0]
    print(f"chunked InfoNCE tile sweep, cpu, B = N = {num}, d = {args.dim}, best of {args.repeats or 1}")
    print(f"{'TILE_ELEMENTS':>13} | {'rows':>5} | {'seconds':>8} | {'CPU s':>7} | {'peak growth':>11}")
    for exponent in (21, 22, 23, 24):
        runs = [run_case(dict(kernel="infonce", method="torch", size=num, dim=args.dim, dtype="float32",
                              device="cpu", tile_elements=2**exponent)) for _ in range(args.repeats or 1)]
        best = min(runs, key=lambda r: r.get("seconds", float("inf")))
        if "error" in best:
            print(f"{'2^' + str(exponent):>13} | failed: {best['error']}")
            continue
        print(f"{'2^' + str(exponent):>13} | {min(num, 2**exponent // num):>5} | {best['seconds']:>8.2f} | "
              f"{best['cpu_seconds']:>7.1f} | {best['peak_bytes'] / 2**20:>7.0f} MiB")
        sys.stdout.flush()


# ---- command line -------------------------------------------------------------------------------

SECTIONS = {"infonce": infonce_section, "attention": attention_section}
CASES = {"infonce": infonce_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                        help="InfoNCE: B = N values")
    parser.add_argument("--dim", type=int, default=1024, help="InfoNCE: embedding width d")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per case (InfoNCE: best time kept, default 1; attention: mean, default 5)")
    parser.add_argument("--tiles", action="store_true", help="InfoNCE: sweep the chunked path's tile size instead")
    parser.add_argument("--methods", nargs="+", choices=["naive", "torch", "triton"],
                        help="InfoNCE: naive, torch (the chunked path), triton; default naive torch (+ triton on GPU)")
    parser.add_argument("--same-process", action="store_true",
                        help="InfoNCE: run every case in this interpreter (quicker; peaks less isolated)")
    add_attention_arguments(parser)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(CASES[case["kernel"]](case)))
        return
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    for name in SECTIONS if args.what == "all" else [args.what]:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
