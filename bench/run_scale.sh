#!/usr/bin/env bash
# The scale table of docs/benchmarks.md (issue 3): D=512, global batch 512, the fused train step
# (forward, backward, sparse SGD-momentum update) for C in {1M, 5M, 10M}, sample rates 1 / 0.1 /
# 0.01, chunked (16,384 classes per block) or not, float32 or bfloat16 storage+compute, at 1 and 2
# workers, where it fits in 24 GiB. JSON lines to $1 (default bench/scale_results.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/scale_results.jsonl}"
: > "$out"
CHUNK=16384
run() {  # classes workers rate chunk(0=none) dtype steps
  local chunk_arg=()
  [ "$4" != 0 ] && chunk_arg=(--chunk-size "$4")
  .venv/bin/pfc bench fc --classes "$1" --dim 512 --batch 512 --workers "$2" --sample-rate "$3" \
    "${chunk_arg[@]}" --dtype "$5" --steps "$6" --margin arcface --json "$out" 2>&1 | grep -E "fc  C=|error|Error"
}
# 1M classes: everything fits.
for workers in 1 2; do
  for rate in 1.0 0.1 0.01; do
    for chunk in 0 $CHUNK; do
      for dtype in float32 bfloat16; do
        run 1000000 $workers $rate $chunk $dtype 3
      done
    done
  done
done
# 5M classes: float32 weights + momentum are 20 GB (no room for an unchunked step); bfloat16 is 10 GB.
for workers in 1 2; do
  run 5000000 $workers 1.0 $CHUNK bfloat16 1
  run 5000000 $workers 0.1 $CHUNK bfloat16 3
  run 5000000 $workers 0.1 0 bfloat16 3
  run 5000000 $workers 0.01 $CHUNK bfloat16 3
done
run 5000000 1 0.1 $CHUNK float32 3
# 10M classes: bfloat16 weights + momentum are 20 GB of the 24 GiB: chunked only.
run 10000000 1 0.1 $CHUNK bfloat16 3
run 10000000 1 0.01 $CHUNK bfloat16 3
run 10000000 1 1.0 $CHUNK bfloat16 1
run 10000000 2 0.1 $CHUNK bfloat16 3
