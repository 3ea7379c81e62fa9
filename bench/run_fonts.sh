#!/usr/bin/env bash
# The real-data tables (docs/benchmarks.md): the typeface dataset, then the margin table.
# About 3 minutes for the data and ~3.5 minutes per head at --steps 1000 on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
make fonts
test -d data/fonts64 || .venv/bin/pfc data fonts data/fonts64 --size 64 --per-style 1
$PY bench/fonts_table.py --steps 1000 "$@"   # the tables in docs/benchmarks.md: 1000 steps
