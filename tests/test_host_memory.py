"""engine/host_memory.py: with glibc's malloc tuned, the steps of a training loop reuse the memory the
steps before them freed instead of faulting pages in again; with huge pages requested before torch is
imported, torch's tensors sit on 2 MiB pages."""
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
STEPS, WARM_UP = 14, 4

# A fresh process trains a small MLP stack on packed batches whose length changes every step, as
# Ember's do; it prints the minor page faults of each step. Activations are 1-14 MB, the sizes
# glibc maps and unmaps on its own.
_LOOP = f"""
import resource, sys, torch
from engine.host_memory import keep_freed_memory
torch.manual_seed(0)
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # once per process; a second call says so too
blocks = [torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256))
          for _ in range(4)]
layers = torch.nn.Sequential(*blocks)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range({STEPS}):
    tokens = 2000 + (step * 397) % 1500
    before = faults()
    layers(torch.randn(tokens, 256)).square().mean().backward()
    print(faults() - before)
"""


def _faults_after_warm_up(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True)
    per_step = [int(line) for line in out.stdout.split()]
    assert len(per_step) == STEPS
    return sum(per_step[WARM_UP:])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_steps_reuse_freed_memory_instead_of_faulting_it_in():
    default, kept = _faults_after_warm_up("default"), _faults_after_warm_up("keep")
    # Measured (glibc 2.36): default 60,000-120,000 faults over the 10 steps, kept 0-8,000.
    assert kept * 4 < default, (default, kept)


# A fresh process: request huge pages (or not) before importing torch, fill a 64 MiB tensor, print
# the process's anonymous memory on huge pages (kB).
_PRINT_HUGE_PAGE_KB = """
import torch
x = torch.ones(16 << 20)
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")))
"""
_HUGE = """
import sys
from engine.host_memory import request_huge_pages
if sys.argv[1] == "request":
    request_huge_pages()
""" + _PRINT_HUGE_PAGE_KB


def _huge_page_kb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", _HUGE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except OSError:
        return "absent"


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel offers no transparent huge pages")
def test_requested_huge_pages_hold_torch_tensors():
    assert _huge_page_kb("request") >= 32 << 10  # at least half of the 64 MiB tensor on 2 MiB pages
    if _thp_mode() == "madvise":  # only what asks for them gets them
        assert _huge_page_kb("default") < 8 << 10


# A fresh process loads a launch script (its module top: imports, not main) and then fills a 64 MiB
# tensor: the script must have asked for huge pages before its imports brought torch in.
_LAUNCH = """
import runpy, sys
runpy.run_path(sys.argv[1], run_name="loaded")
""" + _PRINT_HUGE_PAGE_KB


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel offers no transparent huge pages")
@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_launch_scripts_ask_for_huge_pages_before_torch_is_imported(script):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", script)
    out = subprocess.run([sys.executable, "-c", _LAUNCH, path], capture_output=True, text=True, check=True, env=env)
    assert int(out.stdout.split()[-1]) >= 32 << 10
