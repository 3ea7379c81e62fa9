#!/bin/bash
# End-to-end training throughput and peak memory: iresnet50 at 112x112, 1 and 2 workers,
# backbone float32 vs mixed_bfloat16, without and with gradient checkpointing (docs/benchmarks.md,
# "End to end"). Appends JSON lines to bench/e2e_results.jsonl. Usage: bash bench/run_e2e.sh [STEPS] [BATCH_PER_WORKER]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-12}
batch=${2:-16}
bin=.venv/bin
data=/tmp/pfc-e2e-112
out=bench/e2e_results.jsonl
[ -f "$data/manifest.json" ] || $bin/pfc data synth "$data" --identities 1000 --images-per-identity 8 --shards 4 --size 112
for workers in 1 2; do
  for precision in float32 mixed_bfloat16; do
   for ckpt in false true; do
    run=/tmp/pfc-e2e-run
    rm -rf "$run"
    args=(train --config configs/smoke.yaml --set model.backbone=iresnet50 --set model.embedding_dim=512
          --set data.image_size=112 --set "data.train=$data" --set "data.val=[]" --set data.num_classes=1000
          --set data.shuffle_buffer=500 --set "train.batch_size=$batch" --set "train.steps=$steps"
          --set train.log_every=4 --set "train.run_dir=$run" --set checkpoint.every=0 --set optim.warmup_steps=2
          --set eval.interval=0 --set monitoring.port=0 --set "model.precision=$precision"
          --set "model.gradient_checkpointing=$ckpt")
    if [ "$workers" = 1 ]; then cmd=($bin/pfc "${args[@]}"); else
      cmd=($bin/horovodrun -np 2 -H localhost:2 --gloo $bin/pfc "${args[@]}"); fi
    /usr/bin/time -f "%M" -o /tmp/pfc-e2e-rss "${cmd[@]}" > /tmp/pfc-e2e.log 2>&1 || { tail -20 /tmp/pfc-e2e.log; exit 1; }
    $bin/python - "$run/log.jsonl" "$workers" "$precision" "$batch" "$(cat /tmp/pfc-e2e-rss)" "$out" "$ckpt" <<'PY'
import json, sys
log, workers, precision, batch, rss_kib, out, ckpt = sys.argv[1:]
steps = [r for r in map(json.loads, open(log)) if "samples_per_sec" in r]
row = {"bench": "e2e", "backbone": "iresnet50", "image_size": 112, "workers": int(workers),
       "precision": precision, "gradient_checkpointing": ckpt == "true", "batch_per_worker": int(batch),
       "steps": steps[-1]["step"],
       "samples_per_s": round(steps[-1]["samples_per_sec"], 2),
       "peak_rss_gib_largest_process": round(int(rss_kib) / 2**20, 2)}
print(json.dumps(row))
open(out, "a").write(json.dumps(row) + "\n")
PY
   done
  done
done
