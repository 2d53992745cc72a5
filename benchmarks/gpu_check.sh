#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): at most 8 minutes, its figures as JSON in
# ${OUT:-.}/gpu_check.json (written after every part, so a timeout keeps what was done).
#   bash benchmarks/gpu_check.sh [--smoke] [--skip PARTS]
set -u
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "${OUT:-.}"
timeout 480 "$PY" benchmarks/gpu_check.py --out "${OUT:-.}/gpu_check.json" "$@"
code=$?
[ "$code" = 124 ] && echo "gpu_check: stopped at the 8-minute limit; ${OUT:-.}/gpu_check.json holds the parts done" >&2
exit "$code"
