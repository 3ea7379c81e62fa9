#!/usr/bin/env bash
# Train on one host with N workers (default: one per core, at most 8):
#   launch/run_local.sh CONFIG.yaml [N] [--set KEY=VALUE ...]
set -euo pipefail
config="${1:?usage: launch/run_local.sh CONFIG.yaml [N] [--set KEY=VALUE ...]}"; shift
n="$(nproc)"; [ "$n" -gt 8 ] && n=8
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then n="$1"; shift; fi
bin="$(dirname "$(command -v pfc || echo .venv/bin/pfc)")"
# horovodrun itself loads TensorFlow: keep its start-up banners quiet too (PFC_VERBOSE=1 shows them)
[ "${PFC_VERBOSE:-0}" = 0 ] && export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$bin/horovodrun" -np "$n" -H "localhost:$n" --gloo "$bin/pfc" train --config "$config" "$@"
