#!/usr/bin/env bash
# Print the lock's packages for a CUDA install: every exact pin of requirements.lock except the CPU
# torch and what a CUDA torch brings itself (triton, nvidia-*). Used by bench/gpu/check.sh and the
# Dockerfile, both installing them with --no-deps after the CUDA torch.
set -euo pipefail
lock=${1:-$(dirname "$0")/../../requirements.lock}
grep -vE '^(#|torch==|triton==|nvidia-)' "$lock" | grep -v '^$'
