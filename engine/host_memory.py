"""Host memory: keep what a step frees in the process, so the next step does not fault it in again.

A training step allocates and frees the same large activations every time (on the demo step:
(2,381, 1,536) fp32 tensors of 14.6 MB, hundreds per step). glibc's malloc serves blocks above its
mmap threshold with a fresh mmap and unmaps them on free, so every step faults in every page again
(650,000 minor faults and 1.5 s of system time per 6 s step on the development VM, where a page
fault costs the most: it is a virtual machine). Raising the threshold to glibc's maximum (32 MiB on
64-bit) and never trimming the heap's top turns most of them into reuse (`bench/train_step.py
--host-memory`: 294,000-332,000 -> 35,000-44,000 faults per step, 7.5-7.9 -> 6.7-6.8 s per step;
docs/performance.md, "Host memory"). The price: the process keeps its peak heap until it exits,
which a training or encoding process reaches anyway.

Huge pages: `request_huge_pages()`, called by the launch scripts before torch is imported, sets
THP_MEM_ALLOC_ENABLE=1 (unless the environment says otherwise), which makes torch's CPU allocator
place blocks of 2 MiB and more on 2 MiB pages (madvise(MADV_HUGEPAGE); the kernel's
transparent_hugepage setting must be `madvise` or `always`). Torch reads it once, at its first
allocation, so a program that uses the Python API sets it in its own environment. On the demo
step, with the heap kept: 35,000-44,000 -> 1,600-1,700 page faults per step, 6.7-6.8 -> 6.5 s per
step and 4.8 -> 4.5 GiB peak RSS (fewer page-table pages and TLB misses).

Only glibc has mallopt; elsewhere (macOS, musl) this does nothing. Results do not change.
`EMBER_KEEP_FREED_MEMORY=0` in the environment leaves malloc as it is (a process that must hand
memory back between bursts of work; and the benches' before/after).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
TOP_PAD_BYTES = 64 << 20  # grow the heap in steps of this much more than asked
TRIM_THRESHOLD_BYTES = 2**31 - 1  # (an int) keep up to 2 GiB free at the heap's top

# torch's CPU allocator: 2 MiB-aligned blocks on transparent huge pages for allocations >= 2 MiB.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"

_kept = False


def request_huge_pages(env: dict | None = None) -> dict:
    """Ask torch for huge pages (see above) in `env` (default: this process's environment, which
    works only before torch's first allocation, so before `import torch`; a child process's
    environment otherwise). An explicit THP_MEM_ALLOC_ENABLE already there wins. Returns env."""
    env = os.environ if env is None else env
    env.setdefault(HUGE_PAGES_ENV, "1")
    return env


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process as above; True when it took effect."""
    global _kept
    if _kept:
        return True
    if os.environ.get("EMBER_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    _kept = all(libc.mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES)))
    return _kept
