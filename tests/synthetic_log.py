"""A synthetic RUN_DIR/log.jsonl in the schema of docs/monitoring.md (for `pfc report` tests and the docs image).

python tests/synthetic_log.py RUN_DIR && pfc report RUN_DIR
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path


def write_log(run_dir: Path, steps: int = 3000, every: int = 10, eval_every: int = 500, seed: int = 0) -> Path:
    """Loss decaying from ~22 to ~3, accuracy rising, a learning-rate drop at 60%, two verification sets."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "log.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "time": 1.8e9, "world_size": 2}) + "\n")
        for step in range(every, steps + 1, every):
            f.write(
                json.dumps(
                    {
                        "time": 1.8e9 + 0.5 * step,
                        "step": step,
                        "epoch": step / 1000,
                        "loss": 20 * math.exp(-step / 700) + 2.5 + rng.gauss(0, 0.3),
                        "accuracy": min(1.0, max(0.0, 0.9 * (1 - math.exp(-step / 900)) + rng.gauss(0, 0.03))),
                        "lr": 0.1 if step < 0.6 * steps else 0.01,
                        "samples_per_sec": 1000 + rng.gauss(0, 40) - (300 if step % 1000 < 60 else 0),
                    }
                )
                + "\n"
            )
            if step % eval_every == 0:
                f.write(
                    json.dumps(
                        {
                            "time": 1.8e9 + 0.5 * step,
                            "step": step,
                            "eval": {
                                "lfw": {
                                    "accuracy": 0.99 - 0.3 * math.exp(-step / 800),
                                    "tar@far=1e-3": 0.97 - 0.5 * math.exp(-step / 800),
                                },
                                "cfp_fp": {"accuracy": 0.93 - 0.35 * math.exp(-step / 900)},
                            },
                        }
                    )
                    + "\n"
                )
    return path


if __name__ == "__main__":
    print(write_log(Path(sys.argv[1])))
