#!/usr/bin/env bash
# The allocator comparison of docs/benchmarks.md (issue 3): the same chunked FC steps with
# TensorFlow's oneDNN pool allocator (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0, its reservation cap raised
# by pfc), with pfc's default (the C allocator: no mmap, no trim at free, one malloc arena per
# decoding thread and at least two) and with the C allocator on one arena (pfc's default until
# session 6). JSON lines to $1 (default bench/allocator_results.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/allocator_results.jsonl}"
: > "$out"
run() {  # allocator(pool|system|system-1-arena) classes dtype
  local env=(TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1)
  [ "$1" = pool ] && env=(TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0)
  [ "$1" = system-1-arena ] && env+=(MALLOC_ARENA_MAX=1)
  env "${env[@]}" .venv/bin/pfc bench fc --classes "$2" --dim 512 --batch 512 \
    --workers 1 --sample-rate 0.1 --chunk-size 16384 --dtype "$3" --steps 3 --margin arcface \
    --json "$out" 2>&1 | grep -E "fc  C=|error|Error"
}
for classes in 1000000 10000000; do
  for alloc in pool system system-1-arena; do
    run "$alloc" "$classes" bfloat16
  done
done
for alloc in pool system system-1-arena; do
  run "$alloc" 1000000 float32
done
