#!/usr/bin/env bash
# The reader table of docs/benchmarks.md: a synthetic 112x112 dataset (40,000 JPEGs in 32
# shards: an epoch of each worker is many times the 4,096-image shuffle buffer, as in real
# training), then the full reader vs decode-only (per image and batched) at 1 and 2 workers, the
# reader without its shuffle, and in skip_corrupt mode. JSON lines to $1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/data_results.jsonl}"
data="${DATA:-/tmp/pfc-bench-data-112-40k}"
: > "$out"
# (Written once: a later run reuses the set at $data; delete it to write it again.)
[ -f "$data/manifest.json" ] || .venv/bin/pfc data synth "$data" --identities 2000 --images-per-identity 20 \
  --shards 32 --size 112 --verification-pairs 10 > /dev/null
run() { .venv/bin/pfc bench data "$data" --batch 128 --rounds 5 --json "$out" "$@" 2>&1 | grep -E "^data "; }
for workers in 1 2; do
  run --workers "$workers"
  run --workers "$workers"
done
run --workers 1 --shuffle-buffer 0
run --workers 2 --skip-corrupt
