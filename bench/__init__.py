"""Benchmarks: `pfc bench fc` (bench/fc.py), `pfc bench data` (bench/data.py), the per-op profile
(bench/fc_profile.py); the scripts beside them produce the tables of docs/benchmarks.md.
Imported only when `pfc bench` runs (launch/commands.py)."""
