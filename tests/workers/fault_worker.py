"""Run by `horovodrun -np 2`: `launch.train.train` on train_worker's batches, with a fault.

argv: RUN_DIR kill-rank1-at=K. Checkpoints every 2 steps; worker 1 SIGKILLs itself when it is
about to take batch K, as the kernel's OOM killer or a lost node would end it. Exits through the
`pfc` command line's error handling, so the output is what an operator reads.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_worker  # noqa: E402

import cluster  # noqa: E402
from launch import cli  # noqa: E402
from launch import train as train_lib  # noqa: E402
from launch.config import from_dict  # noqa: E402


def main(run_dir: str, fault: str) -> int:
    kill_at = int(fault.split("=")[1])
    comm = cluster.init()
    b = train_worker.GLOBAL_BATCH // comm.size
    raw = train_worker.config(run_dir, 100, None)
    raw["checkpoint"]["every"] = 2
    cfg = from_dict(raw)

    def data(first):
        for s in range(first, 100):
            if comm.rank == 1 and s == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            images, labels = train_worker.global_batch(s)
            yield images[comm.rank * b : (comm.rank + 1) * b], labels[comm.rank * b : (comm.rank + 1) * b], 0

    return cli.run_guarded(
        "train",
        lambda: train_lib.train(cfg, comm, data=data, steps_per_epoch=10, num_classes=train_worker.NUM_CLASSES) and 0,
    )


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
