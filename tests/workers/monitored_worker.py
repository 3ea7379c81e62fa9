"""Run by horovodrun: a stand-in training loop (a linear model, gradients summed over workers) that feeds
monitoring.TrainingMetrics every step, until STOP_FILE exists. Prints OK rank steps at the end.

    monitored_worker.py BASE_PORT STOP_FILE
"""
import os
import sys
import time

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cluster  # noqa: E402
from monitoring import TrainingMetrics  # noqa: E402

MAX_SECONDS = 120  # never outlive a test that died without writing the stop file


def main(base_port: int, stop_file: str) -> None:
    comm = cluster.init()
    metrics = TrainingMetrics(job="hvd-e2e", rank=comm.rank, local_rank=comm.local_rank, world_size=comm.size,
                              bind="127.0.0.1", base_port=base_port, version="test")
    w = tf.Variable(tf.zeros([8, 1]))
    rng = tf.random.Generator.from_seed(comm.rank)
    start, step = time.monotonic(), 0
    while True:
        t0 = time.perf_counter()
        x = rng.normal([16, 8])
        y = tf.reduce_sum(x, axis=1, keepdims=True)
        t1 = time.perf_counter()
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((x @ w - y) ** 2)
        g = tape.gradient(loss, w)
        t2 = time.perf_counter()
        g = comm.allreduce_sum(g) / comm.size
        t3 = time.perf_counter()
        w.assign_sub(0.05 * g)
        step += 1
        time.sleep(0.05)
        metrics.observe_step(step=step, samples=16, loss=float(loss), accuracy=0.0, lr=0.05, lam=0.0,
                             epoch=step / 100, step_seconds=time.perf_counter() - t0, data_wait_seconds=t1 - t0,
                             comm_seconds=t3 - t2)
        # every worker stops at the same step, or one would wait forever in the next allreduce
        stop = float(os.path.exists(stop_file) or time.monotonic() - start > MAX_SECONDS)
        if comm.allreduce_max(tf.constant([stop]))[0] > 0:
            break
    metrics.close()
    print(f"OK {comm.rank} {step}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
