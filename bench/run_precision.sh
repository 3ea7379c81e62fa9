#!/usr/bin/env bash
# What 16-bit class-matrix storage and logits cost in accuracy (docs/benchmarks.md): the smoke
# config (tiny CNN, ArcFace, 200 synthetic identities at 32x32, 300 steps, global batch 64) trained
# on one worker with fc.param_dtype / fc.compute_dtype float32, bfloat16 and float16, same seed and
# data; prints the final training loss and verification accuracy of each. JSON lines to $1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/precision_results.jsonl}"
data=/tmp/pfc-precision-synth
: > "$out"
.venv/bin/pfc data synth "$data" --identities 200 --images-per-identity 20 --shards 4 --size 32 > /dev/null
for dtype in float32 bfloat16 float16; do
  run=/tmp/pfc-precision-$dtype
  rm -rf "$run"
  .venv/bin/pfc train --config configs/smoke.yaml --set "data.train=$data" \
    --set "data.val=[$data/verification.bin]" --set train.batch_size=64 --set "train.run_dir=$run" \
    --set checkpoint.every=0 --set "fc.param_dtype=$dtype" --set "fc.compute_dtype=$dtype" > /dev/null
  .venv/bin/python - "$run/log.jsonl" "$dtype" "$out" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
last = [l for l in lines if "loss" in l][-1]
ev = [l for l in lines if "eval" in l][-1]["eval"]["verification"]
row = {"bench": "precision", "dtype": sys.argv[2], "steps": last["step"], "final_loss": round(last["loss"], 4),
       "final_batch_accuracy": round(last["accuracy"], 4), "verification_accuracy": round(ev["accuracy"], 4),
       "verification_accuracy_std": round(ev["accuracy_std"], 4), "tar_at_far_1e-3": round(ev["tar"], 4)}
print(json.dumps(row))
open(sys.argv[3], "a").write(json.dumps(row) + "\n")
PY
done
