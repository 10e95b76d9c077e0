#!/usr/bin/env bash
# The GPU benchmark suite, full mode, on one GPU (about 7 minutes; see README "GPU benchmark suite").
#   bash benchmarks/gpu_suite.sh [OUT.json] [more gpu_suite.py options, e.g. --budget-s 300]
set -euo pipefail
out=${1:-benchmarks/results/gpu_suite.json}
case $out in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Allocate on demand, so that each case's peak device memory is its own.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHONPATH=. python3 benchmarks/gpu_suite.py --mode full --json "$out" "${@:2}"
