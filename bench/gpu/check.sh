#!/usr/bin/env bash
# The GPU check: on a bare machine with one NVIDIA GPU, install the project from the lock with the
# CUDA build of torch, run the tests that skip on CPU (pytest -m gpu: bf16 Triton kernels, the real
# flash-attn when installed, CUDA RNG replay in GradCache), train the tiny experiment a few bf16
# steps on the GPU with the Triton kernels and with the PyTorch ones, benchmark attention (Triton vs
# SDPA vs flash-attn, 4K-32K tokens), InfoNCE (Triton vs chunked, B = N = 32K) and a bf16 training
# step of a Qwen3-1.7B-shaped model (tokens/s, MFU), and write a summary with the figures.
#
#   bench/gpu/check.sh OUT                    # a registry is reachable: torch==<lock's version>, CUDA build
#   bench/gpu/check.sh --wheels DIR OUT       # no registry: every wheel from DIR (pip --no-index)
#   bench/gpu/check.sh --torch system OUT     # keep the interpreter's CUDA torch (images that ship one)
#   bench/gpu/check.sh --skip gpu_tests,smoke OUT     # leave steps out (e.g. to rerun the benchmarks alone)
#   bench/gpu/check.sh --dry-run OUT          # the CPU-safe parts in the current environment (benchmarks at toy sizes)
#   bench/gpu/check.sh --dry-run --torch system OUT   # ...and the install itself, around the CPU torch (the suite)
#
# OUT gets summary.md (card, versions, the benchmarks' figures, each step passed/failed/skipped with its
# seconds; rewritten after every step) and one log per step. Exit 0 when no step failed. Reads nvidia-smi,
# never sets anything on the GPU. At most 8 min with --torch system: the steps' timeouts added up
# (10 + 10 + 90 + 150 + 60 + 60 + 40 + 60 s); with the lock's torch the install may take 240 s (10.5 min in
# all). The install lives in $EMBER_GPU_VENV (default /tmp/ember-gpu-venv).
set -uo pipefail

STEPS="machine lock install gpu_tests smoke attention infonce train_step"
usage() {
  echo "usage: bench/gpu/check.sh [--dry-run] [--torch lock|system] [--wheels DIR] [--skip STEP,...] OUT" >&2; exit 2
}
DRY_RUN=0 TORCH_FROM=lock WHEELS="" OUT="" SKIP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --torch) [ $# -ge 2 ] || usage; TORCH_FROM=$2; shift ;;
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift ;;
    --skip) [ $# -ge 2 ] || usage; SKIP=${2//,/ }; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "check.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
case "$TORCH_FROM" in lock|system) ;; *) echo "check.sh: --torch $TORCH_FROM: expected lock or system" >&2; exit 2 ;; esac
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then echo "check.sh: --wheels $WHEELS: no such folder" >&2; exit 2; fi
for name in $SKIP; do
  case " $STEPS " in *" $name "*) ;; *) echo "check.sh: --skip $name: no such step (steps: $STEPS)" >&2; exit 2 ;; esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
LOCK=$REPO/requirements.lock
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/steps.tsv
: > "$RESULTS"
# A rerun into the same OUT never uses the last run's install or figures.
rm -f "$OUT/python.txt" "$OUT/gpu_tests.out" "$OUT"/{attention,infonce,train_step}.out
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # on the GPU the kernels run natively

# step NAME TIMEOUT_S COMMAND...: run it, log to OUT/NAME.log, record passed/failed and seconds.
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status
  case " $SKIP " in *" $name "*) skip "$name" "--skip"; return 1 ;; esac
  echo "== $name" >&2
  # Steps are functions: a child bash inherits them (export -f) so that timeout can bound them.
  if timeout "$limit" bash -c '"$@"' step "$@" > "$OUT/$name.log" 2>&1; then status=passed; else status="failed (exit $?)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$RESULTS"
  echo "   $status in $((SECONDS - start)) s" >&2
  summary  # after every step: a check cut short still leaves what it measured
  [ "$status" = passed ]
}
skip() { printf '%s\t%s\t0\n' "$1" "skipped: $2" >> "$RESULTS"; echo "== $1: skipped ($2)" >&2; summary; }

# --- the machine ---------------------------------------------------------------------------------
machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

# --- the install: the lock, with the CUDA build of torch in place of its CPU line ------------------
# The lock is the CPU install; on a GPU torch brings its own triton and nvidia-* wheels, so those lines
# are left to torch (bench/gpu/requirements.sh) and every other line is installed exactly (--no-deps).
gpu_requirements() {
  "$REPO/bench/gpu/requirements.sh" "$LOCK" > "$OUT/requirements-gpu.txt"
  # Every line must stay an exact pin: the lock is the whole environment.
  ! grep -vE '^[A-Za-z0-9_.-]+==[^ ]+$' "$OUT/requirements-gpu.txt"
}

install() {
  local venv=${EMBER_GPU_VENV:-/tmp/ember-gpu-venv} torch_pin python
  torch_pin=$(grep -m1 '^torch==' "$LOCK" | sed 's/+.*//')  # torch==X.Y.Z: the registry's default build is CUDA's
  [ -n "$WHEELS" ] && export PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELS
  rm -rf "$venv"
  if [ "$TORCH_FROM" = system ]; then
    # The image's interpreter keeps its CUDA torch (it may itself be a venv, whose packages a new venv
    # would not see): the lock's other packages go into a folder ahead of its own on PYTHONPATH.
    # --no-compile: byte-compiling the lock's packages took half of the install (40 of 78 s on CPU);
    # the modules the check imports compile on first import anyway.
    "$PY" -m pip install -q --no-compile --no-deps --target "$venv/site" -r "$OUT/requirements-gpu.txt" || return 1
    python=$venv/python
    printf '#!/bin/sh\nPYTHONPATH=%s:%s${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' \
      "$venv/site" "$REPO" "$(command -v "$PY")" > "$python" && chmod +x "$python"
  else
    "$PY" -m venv "$venv" && "$venv/bin/python" -m pip install -q "$torch_pin" &&
      "$venv/bin/python" -m pip install -q --no-compile --no-deps -r "$OUT/requirements-gpu.txt" &&
      "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO" || return 1
    python=$venv/bin/python
  fi
  "$python" -c "import os, torch, transformers, engine.kernels.attention, kernels
assert torch.cuda.is_available() or os.environ['DRY_RUN'] == '1', 'torch ' + torch.__version__ + ' sees no CUDA device'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" &&
    echo "$python" > "$OUT/python.txt"
}

dry_install() {
  echo "dry run: would install $(grep -m1 '^torch==' "$LOCK" | sed 's/+.*//') (CUDA build) and" \
       "$(wc -l < "$OUT/requirements-gpu.txt") pinned packages from $OUT/requirements-gpu.txt"
  "$PY" -c "import torch, transformers, engine.kernels.attention, kernels
print('torch', torch.__version__, 'transformers', transformers.__version__)" && echo "$PY" > "$OUT/python.txt"
}

# --- the tests that skip on CPU ---------------------------------------------------------------------
gpu_tests() {
  local python; python=$(cat "$OUT/python.txt")
  (cd "$REPO" && "$python" -m pytest -q -m gpu -rs tests) | tee "$OUT/gpu_tests.out"
  local code=${PIPESTATUS[0]}
  # None selected means the marker broke: that is a failure, not a pass.
  grep -qE '[0-9]+ (passed|skipped)' "$OUT/gpu_tests.out" || { echo "no gpu test was selected"; return 1; }
  return "$code"
}

# --- a bf16 training smoke run: Triton kernels against the PyTorch ones ------------------------------
smoke() {
  local python device steps; python=$(cat "$OUT/python.txt")
  if [ "$DRY_RUN" = 1 ]; then device=cpu steps=1; else device=cuda steps=3; fi
  local common=(+exp=tiny "train.device=$device" "train.max_steps=$steps" data.eval=null train.save_final=false)
  (cd "$REPO" &&
    "$python" launch/train.py "${common[@]}" "train.output_dir=$OUT/smoke_torch" \
      kernels.attention=sdpa kernels.infonce=torch &&
    if [ "$DRY_RUN" = 1 ]; then exit 0; fi &&
    "$python" launch/train.py "${common[@]}" "train.output_dir=$OUT/smoke_triton" \
      kernels.attention=triton kernels.infonce=triton) || return 1
  "$python" - "$OUT" "$DRY_RUN" <<'EOF'
import json, math, os, sys
out, dry = sys.argv[1], sys.argv[2] == "1"
def losses(run):
    with open(os.path.join(out, run, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]
torch_losses = losses("smoke_torch")
assert torch_losses and all(math.isfinite(x) for x in torch_losses), torch_losses
print("losses, PyTorch kernels:", torch_losses)
if not dry:
    triton_losses = losses("smoke_triton")
    print("losses, Triton kernels: ", triton_losses)
    # bf16 autocast: the two back-ends round differently; 2e-2 relative is a few bf16 ulps of a loss near 3.
    for a, b in zip(torch_losses, triton_losses):
        assert abs(a - b) <= 2e-2 * abs(a), (torch_losses, triton_losses)
EOF
}

# --- benchmarks: the figures for docs/performance.md ("GPU check") ----------------------------------
# Each prints one `figure:` line per measured size, which the summary copies. The dry run runs the
# same scripts on CPU at toy sizes (Triton under its interpreter), so these lines cannot rot.

# bench NAME SCRIPT ARGS...: SCRIPT with the install's interpreter, its output also in OUT/NAME.out;
# passes when it exits 0 having printed a figure.
bench() {
  local name=$1 python; shift; python=$(cat "$OUT/python.txt")
  (cd "$REPO" && "$python" "$@") | tee "$OUT/$name.out"
  local code=${PIPESTATUS[0]}
  grep -q '^figure: ' "$OUT/$name.out" || { echo "$name: no figure printed"; return 1; }
  return "$code"
}

attention_bench() {
  if [ "$DRY_RUN" = 1 ]; then
    TRITON_INTERPRET=1 bench attention bench/kernel_bench.py --what attention --device cpu --tokens 32 --q-heads 2 \
      --kv-heads 1 --head-dim 16 --dtype float32 --repeats 1 --backends triton sdpa flash_attn
  else  # GQA as Qwen3-8B and Llama-3-8B: 32 query heads over 8 KV heads of 128
    bench attention bench/kernel_bench.py --what attention --tokens 4096 8192 16384 32768 --q-heads 32 --kv-heads 8 \
      --head-dim 128 --dtype bfloat16 --backends triton sdpa flash_attn
  fi
}

infonce_bench() {
  if [ "$DRY_RUN" = 1 ]; then
    TRITON_INTERPRET=1 bench infonce bench/kernel_bench.py --what infonce --sizes 64 --dim 16 --methods torch triton \
      --same-process
  else  # d = 1024: the width of Qwen3-Embedding-0.6B's vectors (the 8B's are 4096)
    bench infonce bench/kernel_bench.py --what infonce --sizes 32768 --dim 1024 --methods torch triton
  fi
}

train_step_bench() {
  if [ "$DRY_RUN" = 1 ]; then bench train_step bench/gpu_train_step.py --tiny
  else bench train_step bench/gpu_train_step.py --warmup 2 --steps 3; fi
}

# The summary, rewritten after every step.
summary() {
  {
    echo "# GPU check"
    echo
    echo "- card: $CARD"
    echo "- commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- mode: torch from $TORCH_FROM${WHEELS:+, wheels from $WHEELS}$([ "$DRY_RUN" = 1 ] && echo ", dry run")"
    [ -f "$OUT/install.log" ] && echo "- versions: $(grep -m1 '^torch ' "$OUT/install.log" || echo unknown)"
    [ -f "$OUT/gpu_tests.out" ] && echo "- gpu tests: $(tail -1 "$OUT/gpu_tests.out")"
    [ -f "$OUT/smoke.log" ] && grep '^losses' "$OUT/smoke.log" | sed 's/^/- /'
    for name in attention infonce train_step; do
      [ -f "$OUT/$name.out" ] && grep '^figure: ' "$OUT/$name.out" | sed 's/^figure: /- /'
    done
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r name status seconds; do echo "| $name | $status | $seconds |"; done < "$RESULTS"
  } > "$OUT/summary.md"
}

# --- run ---------------------------------------------------------------------------------------------
export DRY_RUN TORCH_FROM WHEELS OUT REPO LOCK PY
export -f machine gpu_requirements install dry_install gpu_tests smoke bench attention_bench infonce_bench \
  train_step_bench
CARD="(not queried)"
if [ "$DRY_RUN" = 1 ]; then
  CARD="(dry run: no GPU queried)"
  skip machine "dry run"
else
  step machine 10 machine && CARD=$(head -1 "$OUT/machine.log")
fi
step lock 10 gpu_requirements
# A dry run installs for real with --torch system (the CPU torch stands in for the image's CUDA one);
# with the lock's torch it only says what it would install (a CUDA torch is GBs, hence 240 s for the
# real one, against 90 s for the lock's small wheels beside the image's torch).
if [ "$DRY_RUN" = 1 ] && [ "$TORCH_FROM" = lock ]; then step install 120 dry_install
elif [ "$DRY_RUN" = 0 ] && [ "$TORCH_FROM" = system ]; then step install 90 install
else step install 240 install; fi  # the dry run's own install: a loaded 2-core VM, not the GPU budget
# The benchmarks run after the GPU tests: Triton's disk cache keeps the kernels those compiled, and the
# attention benchmark's shapes (bf16, D 128, 4 query heads per KV head) can reuse them.
if [ -s "$OUT/python.txt" ]; then
  step gpu_tests 150 gpu_tests
  step smoke 60 smoke
  step attention 60 attention_bench
  step infonce 40 infonce_bench
  step train_step 60 train_step_bench
else
  for name in gpu_tests smoke attention infonce train_step; do skip "$name" "install failed"; done
fi

summary
cat "$OUT/summary.md"
! grep -q $'\tfailed' "$RESULTS"
