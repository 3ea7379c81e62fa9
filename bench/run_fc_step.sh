#!/usr/bin/env bash
# The FC step table of docs/benchmarks.md ("FC step: the training paths"): each path of the layer
# at B = 256 and 512, D = 512, 1 worker with 1 intra-op thread (the second core stays free, so a
# ratio is not shifted by a neighbour), ratio = step / the bare matmuls of the same rows,
# alternated with them in one process. JSON lines to $1. To compare another version of the
# layer, put its packages first on PYTHONPATH (the editable install is searched after it).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/fc_step_results.jsonl}"
: > "$out"
run() { .venv/bin/pfc bench fc --dim 512 --steps 5 --threads 1 --json "$out" "$@" 2>&1 | grep -E "^fc  C="; }
for batch in 256 512; do
  run --classes 100000 --batch "$batch" --mode tape --margin amsoftmax
  run --classes 100000 --batch "$batch" --mode tape --margin arcface
  run --classes 100000 --batch "$batch" --mode train
  run --classes 100000 --batch "$batch" --mode train --chunk-size 16384
  run --classes 100000 --batch "$batch" --mode train --sample-rate 0.1
  run --classes 1000000 --batch "$batch" --mode train --sample-rate 0.01
  run --classes 100000 --batch "$batch" --mode train --dtype bfloat16
  run --classes 100000 --batch "$batch" --mode tape --margin arcface --dtype bfloat16
done
