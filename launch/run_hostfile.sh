#!/usr/bin/env bash
# Train on several hosts listed in a hostfile (one "host slots=N" line per host; every host must
# reach the others by ssh without a password, have this package installed at the same path, and
# see the data and checkpoint directories at the same paths, e.g. NFS):
#   launch/run_hostfile.sh HOSTFILE CONFIG.yaml [--set KEY=VALUE ...]
set -euo pipefail
hostfile="${1:?usage: launch/run_hostfile.sh HOSTFILE CONFIG.yaml [--set KEY=VALUE ...]}"
config="${2:?usage: launch/run_hostfile.sh HOSTFILE CONFIG.yaml [--set KEY=VALUE ...]}"; shift 2
# Horovod's parser wants exactly "host slots=N" lines: drop comments and blanks, default slots=1.
clean="$(mktemp)"; trap 'rm -f "$clean"' EXIT
awk '{ sub(/#.*/, "") } NF { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n = a[2] }
       print $1 " slots=" n }' "$hostfile" > "$clean"
np="$(awk '{ split($2, a, "="); s += a[2] } END { print s + 0 }' "$clean")"
if [ "$np" -lt 1 ]; then echo "run_hostfile.sh: no hosts in $hostfile" >&2; exit 2; fi
bin="$(dirname "$(command -v pfc || echo .venv/bin/pfc)")"
# horovodrun itself loads TensorFlow: keep its start-up banners quiet too (PFC_VERBOSE=1 shows them)
[ "${PFC_VERBOSE:-0}" = 0 ] && export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
"$bin/horovodrun" -np "$np" --hostfile "$clean" --gloo "$bin/pfc" train --config "$config" "$@"
