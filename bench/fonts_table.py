"""The margin table on real data (docs/benchmarks.md): each head trained on the typeface dataset
with the same data, backbone, steps and seed (configs/fonts.yaml), 2 workers, then `pfc eval`.

    python bench/fonts_table.py [--steps N] [--margins arcface,cosface,...] [--out bench/fonts_results.jsonl]

Each row: verification accuracy ± fold std and TAR@FAR=1e-3 on both .bin sets, closed-set top-1,
the final training loss and the wall time. The .bin and closed sets are only reported, never used
to choose anything (no early stopping: every run trains its full budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# The papers' settings; normface at the scale of the margin heads, so the rows isolate the margin.
HEADS = {
    "softmax": {"name": "softmax"},
    "normface": {"name": "normface", "scale": 64.0},
    "asoftmax": {
        "name": "asoftmax",
        "margin": 4,
        "lambda_": {"base": 1000.0, "gamma": 0.12, "power": 1.0, "minimum": 5.0},
    },
    "amsoftmax": {"name": "amsoftmax", "scale": 30.0, "margin": 0.35},
    "cosface": {"name": "cosface", "scale": 64.0, "margin": 0.4},
    "arcface": {"name": "arcface", "scale": 64.0, "margin": 0.5},
    "combined": {"name": "combined", "scale": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
    "curricularface": {"name": "curricularface", "scale": 64.0, "margin": 0.5},
    "adaface": {"name": "adaface", "scale": 64.0, "margin": 0.4, "h": 0.333},
    "magface": {"name": "magface", "scale": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0},
    "subcenter_arcface": {"name": "subcenter_arcface", "scale": 64.0, "margin": 0.5, "k": 3},
    "sphereface2": {"name": "sphereface2", "scale": 40.0, "margin": 0.4, "lam": 0.7, "t": 3.0, "loss_weight": 50.0},
}


def run_config(base: dict, head: str, steps: int, run_dir: str, extra: dict) -> str:
    cfg = json.loads(json.dumps(base))
    cfg["loss"] = dict(HEADS[head])  # a copy: --set loss.KEY must not change the table of heads
    cfg["train"].update(steps=steps, run_dir=run_dir)
    for dotted, value in extra.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def progress(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def final_loss(run_dir: str) -> float | None:
    rows = progress(run_dir)
    return rows[-1]["loss"] if rows else None


def samples_per_sec(run_dir: str) -> float | None:
    """The median throughput of the progress windows after the first (compilation) one."""
    rates = sorted(r["samples_per_sec"] for r in progress(run_dir)[1:])
    return rates[len(rates) // 2] if rates else None


def train_and_eval(config: str, workers: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run(
        [
            os.path.join(BIN, "horovodrun"),
            "-np",
            str(workers),
            "-H",
            f"localhost:{workers}",
            "--gloo",
            os.path.join(BIN, "pfc"),
            "train",
            "--config",
            config,
        ],
        cwd=ROOT,
        check=True,
    )
    wall = time.perf_counter() - t0
    out = config + ".eval.json"
    subprocess.run([os.path.join(BIN, "pfc"), "eval", "--config", config, "--json", out], cwd=ROOT, check=True)
    with open(out) as f:
        return wall, json.load(f)


def row(head: str, steps: int, workers: int, wall: float, ev: dict, run_dir: str, extra: dict, data: str) -> dict:
    sets = {
        name: {k: r[k] for k in ("accuracy", "accuracy_std", "tar", "far_target", "num_pairs")}
        for name, r in ev["eval"].items()
    }
    return {
        "head": head,
        "loss_config": HEADS[head],
        "steps": steps,
        "workers": workers,
        "overrides": extra,
        "data": data,
        "wall_s": round(wall, 1),
        "final_loss": final_loss(run_dir),
        "samples_per_sec": samples_per_sec(run_dir),
        "closed_top1": ev.get("closed_top1"),
        "sets": sets,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| head | (a) seen typefaces: acc ± std | TAR@1e-3 | (b) unseen typefaces: acc ± std | TAR@1e-3 "
        "| closed-set top-1 | final loss | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["sets"]["verification_seen_faces"]
        b = r["sets"]["verification_unseen_faces"]
        lines.append(
            f"| {r['head']} | {a['accuracy']:.4f} ± {a['accuracy_std']:.4f} | {a['tar']:.4f} "
            f"| {b['accuracy']:.4f} ± {b['accuracy_std']:.4f} | {b['tar']:.4f} | {r['closed_top1']:.4f} "
            f"| {r['final_loss']:.3f} | {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "fonts.yaml"))
    p.add_argument("--steps", type=int, default=None, help="default: the config's train.steps")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--margins", default=",".join(HEADS), help="comma-separated heads")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="SECTION.KEY=YAML",
        help="also override a config key in every run (e.g. fc.sample_rate=0.1)",
    )
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "fonts_table"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "fonts_results.jsonl"))
    args = p.parse_args(argv)
    with open(args.config) as f:
        base = yaml.safe_load(f)
    steps = args.steps or base["train"]["steps"]
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.extra)}
    tag = "_".join(f"{k}={v}" for k, v in extra.items()).replace("/", "")
    rows = []
    for head in args.margins.split(","):
        run_dir = os.path.join(args.runs, f"{head}{'_' + tag if tag else ''}")
        config = run_config(base, head, steps, run_dir, extra)
        wall, ev = train_and_eval(config, args.workers)
        data = extra.get("data.train", base["data"]["train"])
        rows.append(row(head, steps, args.workers, wall, ev, run_dir, extra, data))
        with open(args.out, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
