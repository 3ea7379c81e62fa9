#!/usr/bin/env bash
# The allocator comparison of docs/benchmarks.md (issue 3): the same chunked FC steps with
# TensorFlow's oneDNN pool allocator (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0, its reservation cap raised
# by pfc) and with pfc's default (the C allocator: one arena, no mmap, no trim at free).
# JSON lines to $1 (default bench/allocator_results.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/allocator_results.jsonl}"
: > "$out"
run() {  # allocator(0=pool,1=system) classes dtype
  TF_ONEDNN_USE_SYSTEM_ALLOCATOR="$1" .venv/bin/pfc bench fc --classes "$2" --dim 512 --batch 512 \
    --workers 1 --sample-rate 0.1 --chunk-size 16384 --dtype "$3" --steps 3 --margin arcface \
    --json "$out" 2>&1 | grep -E "fc  C=|error|Error"
}
for classes in 1000000 10000000; do
  for alloc in 0 1; do
    run "$alloc" "$classes" bfloat16
  done
done
for alloc in 0 1; do
  run "$alloc" 1000000 float32
done
