"""Run by horovodrun: checks every collective of `cluster` and its gradient, eagerly and inside
tf.function, against values each worker can compute from its rank alone. Prints OK on success."""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cluster  # noqa: E402


def local_data(rank, b=3, d=4):
    return tf.constant(np.arange(b * d, dtype=np.float32).reshape(b, d) + 100.0 * rank)


def check(comm, fn_wrap):
    r, n = comm.rank, comm.size
    b, d = 3, 4
    x = local_data(r)
    everyone = np.concatenate([local_data(q).numpy() for q in range(n)])

    # allgather: values and gradient = reduce-scatter of SUMS of the upstream shares
    weights = tf.constant(np.full((n * b, d), r + 1.0, np.float32))  # a different upstream per worker

    def gather_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            g = comm.allgather(x)
            y = tf.reduce_sum(g * weights)
        return g, tape.gradient(y, x)

    g, dx = fn_wrap(gather_and_grad)(x)
    np.testing.assert_array_equal(g.numpy(), everyone)
    np.testing.assert_allclose(dx.numpy(), np.full((b, d), sum(q + 1.0 for q in range(n))))

    # allreduce sum / max, and the sum's gradient (sum over workers of the upstream shares)
    def reduce_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            s = comm.allreduce_sum(x)
            y = tf.reduce_sum(s) * (r + 1.0)
        return s, comm.allreduce_max(x), tape.gradient(y, x)

    s, m, ds = fn_wrap(reduce_and_grad)(x)
    np.testing.assert_allclose(s.numpy(), sum(local_data(q).numpy() for q in range(n)))
    np.testing.assert_array_equal(m.numpy(), local_data(n - 1).numpy())
    np.testing.assert_allclose(ds.numpy(), np.full((b, d), sum(q + 1.0 for q in range(n))))

    # reduce-scatter of sums, and its gradient (allgather of the upstream)
    big = tf.constant(np.arange(n * b * d, dtype=np.float32).reshape(n * b, d) * (r + 1.0))

    def rs_and_grad(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            out = comm.reduce_scatter_sum(t)
            y = tf.reduce_sum(out * (r + 1.0))
        return out, tape.gradient(y, t)

    out, dt = fn_wrap(rs_and_grad)(big)
    full = np.arange(n * b * d, dtype=np.float32).reshape(n * b, d) * sum(q + 1.0 for q in range(n))
    np.testing.assert_allclose(out.numpy(), full[r * b : (r + 1) * b])
    np.testing.assert_allclose(dt.numpy(), np.repeat(np.arange(1.0, n + 1), b)[:, None] * np.ones(d))

    # integers pass through allgather / allreduce without a gradient
    ints = fn_wrap(lambda t: comm.allgather(t))(tf.constant([r, r], tf.int64))
    np.testing.assert_array_equal(ints.numpy(), np.repeat(np.arange(n), 2))


def main():
    comm = cluster.init()
    assert comm.backend == "horovod", comm
    assert cluster.init() is comm
    assert comm.size == int(sys.argv[1]) and 0 <= comm.rank < comm.size
    assert comm.local_size == comm.size and comm.local_rank == comm.rank  # one host
    check(comm, lambda f: f)
    check(comm, tf.function)
    v = tf.Variable([float(comm.rank), 7.0 + comm.rank])
    comm.broadcast_variables([v], root=0)
    np.testing.assert_array_equal(v.numpy(), [0.0, 7.0])
    comm.barrier()
    print(f"OK rank {comm.rank} of {comm.size}", flush=True)


if __name__ == "__main__":
    main()
