#!/usr/bin/env bash
# The FC step table of docs/benchmarks.md ("FC step: the training paths"): each path of the layer
# at B = 256 and 512, D = 512, 1 worker with 1 intra-op thread (the second core stays free, so a
# ratio is not shifted by a neighbour), ratio = step / the bare matmuls of the same rows,
# alternated with them in one process. JSON lines to $1.
# $2 (optional): a directory holding another version's partitioned_fc/ and cluster/ (e.g.
# `git archive REV partitioned_fc cluster | tar -x -C DIR`); each row then runs that version first
# (first on PYTHONPATH, so it is imported instead of this checkout's), into $1.baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/fc_step_results.jsonl}"
baseline="${2:-}"
: > "$out"
[ -n "$baseline" ] && : > "$out.baseline"
one() { .venv/bin/pfc bench fc --dim 512 --steps 5 --threads 1 "$@" 2>&1 | grep -E "^fc  C="; }
run() {
  if [ -n "$baseline" ]; then
    echo -n "baseline: "; PYTHONPATH="$(realpath "$baseline")" one --json "$out.baseline" "$@"
  fi
  one --json "$out" "$@"
}
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
