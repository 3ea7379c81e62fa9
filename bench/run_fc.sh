#!/usr/bin/env bash
# The FC table of docs/benchmarks.md: C in {100k, 1M}, D=512, global B=256, 1 and 2 workers,
# ArcFace (normalized weights) and plain softmax. Prints one line per run; JSON lines to $1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/fc_results.jsonl}"
: > "$out"
for classes in 100000 1000000; do
  for workers in 1 2; do
    for margin in arcface softmax; do
      .venv/bin/pfc bench fc --classes "$classes" --dim 512 --batch 256 --workers "$workers" \
        --steps 5 --margin "$margin" --mode tape --json "$out" 2>&1 | grep -E "fc  C="
    done
  done
done
# The larger-batch rows (the overhead is per class row, the matmuls grow with B).
for workers in 1 2; do
  .venv/bin/pfc bench fc --classes 100000 --dim 512 --batch 1024 --workers "$workers" \
    --steps 5 --margin arcface --mode tape --json "$out" 2>&1 | grep -E "fc  C="
done
