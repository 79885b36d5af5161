#!/usr/bin/env bash
# GPU check: a 7B-shaped random-weight LLaVA-NeXT in transformers on CUDA (fp16) at budgets 1.0 / 0.4 / 0.2,
# HiRED through export/reference.py: TTFT, decode tok/s, peak GPU memory. Writes gpu_check.md/.json under $OUT.
#
#   bench/gpu_check.sh                                   # on the accelerator machine (its own python3 + torch)
#   bench/gpu_check.sh --model tiny --device cpu         # anywhere, in seconds
#   PYTHON=.venv/bin/python bench/gpu_check.sh ...       # pick the interpreter
#
# Every flag: bench/gpu_check.sh --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 or python on PATH; set PYTHON=/path/to/python" >&2
  exit 2
fi
exec "$PY" -m bench.gpu_check "$@"
