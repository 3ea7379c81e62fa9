"""`PartitionedFC`: the model-parallel classification layer and its exact margin loss."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

import cluster as cluster_lib
from partitioned_fc import binary, sharded_softmax
from partitioned_fc import margins as margins_lib
from partitioned_fc.optimizer import ShardOptimizer
from partitioned_fc.sharding import init_rows, shard_range

DTYPES = ("float32", "bfloat16", "float16")


class FCStep(NamedTuple):
    """What `PartitionedFC.train_step` returns."""

    loss: tf.Tensor  # [] mean loss over the global batch, the same on every worker
    accuracy: tf.Tensor  # [] top-1 accuracy over the global batch
    d_embeddings: tf.Tensor  # [B_r, D] dloss/d(local embeddings); SUM backbone grads over workers
    applied: tf.Tensor  # [] bool: False when the loss was not finite and nothing was updated


class PartitionedFC(tf.Module):
    """The `[C, D]` class matrix split by rows over the workers, and the exact global loss.

    Each worker owns the contiguous classes `class_range = (start, end)` and stores them in
    `weight` (`tf.Variable [g·(end - start), D]`, g = `margin.rows_per_class`: 1, or Sub-center
    ArcFace's k sub-centers of a class in adjacent rows; `row_range` = (g·start, g·end)).
    Calling the layer with this worker's embeddings `[B_r, D]` and labels `[B_r]` (int32/int64;
    every worker the same B_r) returns the margin softmax loss (SphereFace2: its binary loss)
    averaged over the GLOBAL batch `B = Σ B_r`, identical on every worker.

    Its gradient w.r.t. `weight` is exact (nobody else holds these rows); its gradient w.r.t. the
    local embeddings is exact for the global mean loss, so a data-parallel backbone must SUM its
    gradients over workers (not average them).

    Two ways to train it:
    - `loss = fc(emb, labels)` under a `tf.GradientTape`, then `optimizer.apply_gradient(grad, lr)`
      with a `partitioned_fc.optimizer` (the gradient is dense, or IndexedSlices when sampling);
    - `fc.train_step(emb, labels, optimizer, lr)`: loss, accuracy and d(loss)/d(emb); the shard
      rows are updated block by block inside the backward, so no weight-sized gradient ever exists.
      With `chunk_size` this bounds a step's memory by weights + optimizer state + O(B·chunk_size).

    Args:
      num_classes: C. embedding_dim: D.
      margin: a `partitioned_fc.margins.Margin` (default ArcFace). A binary margin (SphereFace2)
        trains its bias `margin.bias` too: its gradient is summed over workers.
      cluster: a `cluster.Cluster` (default `cluster.init()`).
      seed: the initial matrix is N(0, 0.01²) drawn from `seed`; for the same seed the union of
        the shards is the same [g·C, D] matrix at every world size.
      sample_rate: Partial FC (An et al.). Below 1, each call keeps every owned class that is a
        label in the global batch and fills up to max(1, int(sample_rate · C_r)) classes with
        uniformly sampled negatives (seeded, reproducible); logits, softmax and gradient use only
        those classes' rows, whose local indices (all g rows of each class) are left in
        `sampled_index`. 1.0 is the full layer.
      chunk_size: None (the `[B, C_r]` exponentials are kept, fastest) or K: logits in blocks of K
        classes with a streaming logsumexp, recomputed in the backward; `[B, C_r]` never exists.
      compute_dtype: dtype of the logits matmuls ('float32', 'bfloat16', 'float16'); softmax
        statistics and gradients stay float32.
      param_dtype: dtype of the stored shard (and of its optimizer state); 16-bit halves the bytes
        per identity. Updates are computed in float32 and rounded once when stored.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: margins_lib.Margin | None = None,
        cluster: cluster_lib.Cluster | None = None,
        seed: int = 0,
        sample_rate: float = 1.0,
        chunk_size: int | None = None,
        compute_dtype: str = "float32",
        param_dtype: str = "float32",
        name: str | None = None,
    ):
        super().__init__(name=name or "partitioned_fc")
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        if margin is not None and not isinstance(margin, margins_lib.Margin):
            raise TypeError(f"margin must be a partitioned_fc.margins.Margin, got {type(margin).__name__}")
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
        for key, value in (("compute_dtype", compute_dtype), ("param_dtype", param_dtype)):
            if value not in DTYPES:
                raise ValueError(f"{key} must be one of {DTYPES}, got {value!r}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.margin = margin if margin is not None else margins_lib.ArcFace()
        self.cluster = cluster if cluster is not None else cluster_lib.init()
        self.seed = int(seed)
        self.sample_rate = float(sample_rate)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.compute_dtype = compute_dtype
        self.param_dtype = param_dtype
        self.class_range = shard_range(self.num_classes, self.cluster.size, self.cluster.rank)
        rows = self.row_range[1] - self.row_range[0]
        with self.name_scope:
            self.weight = tf.Variable(tf.zeros([rows, self.embedding_dim], param_dtype), name="weight")
            # Drives λ schedules (SphereFace); the training loop advances it.
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # Negative sampling: a per-shard stream, part of the checkpointed state (None: no
            # sampling), and the rows the last call used.
            self.sampler: tf.random.Generator | None = None
            self.sampled_index: tf.Variable | None = None
            if self.sample_rate < 1.0:
                self.sampler = tf.random.Generator.from_seed(self.seed * 1_000_003 + self.class_range[0], alg="philox")
                self.sampled_index = tf.Variable(
                    tf.zeros([0], tf.int32), trainable=False, shape=tf.TensorShape([None]), name="sampled_index"
                )
        init_rows(self.weight, self.row_range[0], self.seed)
        self.margin.bind(self.num_classes)  # SphereFace2: its bias starts where C puts it

    @property
    def num_local_classes(self) -> int:
        return self.class_range[1] - self.class_range[0]

    @property
    def rows_per_class(self) -> int:
        return self.margin.rows_per_class

    @property
    def row_range(self) -> tuple[int, int]:
        """(first, end) of this shard's rows in the [g·C, D] matrix of every class's rows."""
        g = self.rows_per_class
        return g * self.class_range[0], g * self.class_range[1]

    def get_config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "margin": self.margin.get_config(),
            "seed": self.seed,
            "sample_rate": self.sample_rate,
            "chunk_size": self.chunk_size,
            "compute_dtype": self.compute_dtype,
            "param_dtype": self.param_dtype,
        }

    @classmethod
    def from_config(cls, config: dict, cluster: cluster_lib.Cluster | None = None) -> PartitionedFC:
        config = dict(config)
        config["margin"] = margins_lib.from_config(config["margin"])
        return cls(cluster=cluster, **config)

    def __call__(self, embeddings, labels, *, step=None, return_accuracy: bool = False):
        """[B_r, D] float, [B_r] int -> scalar loss (and [] top-1 accuracy if return_accuracy)."""
        x_all, local_label = self._gather_batch(embeddings, labels)
        index, local_label = self._select_rows(local_label)
        # The tape form differentiates w.r.t. a tensor of the rows taking part (the whole shard,
        # or a gather of the sampled rows, whose gradient is then IndexedSlices).
        weight = tf.convert_to_tensor(self.weight) if index is None else tf.gather(self.weight, index)
        kernels = {"chunk_size": self.chunk_size, "compute_dtype": tf.as_dtype(self.compute_dtype)}
        if self.margin.binary:  # SphereFace2: its bias gets its gradient too
            args = (self.cluster, x_all, weight, self.margin.bias, local_label, self.margin)
            per_sample, correct = binary.sharded_binary_loss(*args, **kernels)
        else:
            args = (self.cluster, x_all, weight, local_label, self.margin, self._step(step))
            per_sample, correct = sharded_softmax.sharded_cross_entropy(*args, **kernels)
        loss = tf.reduce_mean(per_sample)
        if return_accuracy:
            return loss, tf.reduce_mean(correct)
        return loss

    def train_step(self, embeddings, labels, optimizer: ShardOptimizer, lr, *, step=None) -> FCStep:
        """Forward, backward and the shard update in one pass: [B_r, D], [B_r] -> `FCStep`.

        The shard rows taking part are updated by `optimizer` (built on `self.weight`) with their
        exact gradient as each block of them is done; other rows and their state are untouched. If
        the loss is not finite (the same verdict on every worker), nothing is updated and
        `applied` is False. Call it outside the backbone's tape and pass `d_embeddings` to
        `tape.gradient(emb, backbone_vars, output_gradients=...)`.
        """
        if optimizer.weight is not self.weight:
            raise ValueError("the optimizer was built for another layer's weight")
        x = tf.convert_to_tensor(embeddings)
        x_all, local_label = self._gather_batch(x, labels)
        index, local_label = self._select_rows(local_label)
        source = sharded_softmax.RowSource(self.weight, index, self.rows_per_class)
        fwd = self._forward(x_all, source, local_label, step)
        loss = tf.reduce_mean(fwd.loss)
        finite = tf.math.is_finite(loss)
        lr = tf.cast(lr, tf.float32)
        sink = sharded_softmax.RowUpdates(self.weight, optimizer.slots(), optimizer.rule, lr)

        def run_backward():
            d_loss = tf.fill(tf.shape(fwd.loss), 1.0 / tf.cast(tf.size(fwd.loss), tf.float32))
            dx, done = self._backward(fwd, source, d_loss, sink, lr)
            with tf.control_dependencies(done):
                return tf.identity(dx)

        dx_all = tf.cond(finite, run_backward, lambda: tf.zeros_like(x_all))
        d_emb = self.cluster.reduce_scatter_sum(dx_all)  # each worker's rows, summed over shards
        return FCStep(loss, tf.reduce_mean(fwd.correct), tf.cast(d_emb, x.dtype), finite)

    def _step(self, step):
        return self.step if step is None else step

    def _forward(self, x_all, source, local_label, step):
        """The softmax's or the binary loss's forward over the rows of `source`."""
        kernels = {"chunk_size": self.chunk_size, "compute_dtype": tf.as_dtype(self.compute_dtype)}
        if self.margin.binary:
            return binary.forward(self.cluster, x_all, source, local_label, self.margin, self.margin.bias, **kernels)
        return sharded_softmax.forward(
            self.cluster, x_all, source, local_label, self.margin, self._step(step), **kernels
        )

    def _backward(self, fwd, source, d_loss, sink, lr):
        """-> (dL/dx [B, D] this shard's share, the ops that must run first: the row updates and,
        for the binary loss, the bias's gradient step, b -= lr · dL/db summed over workers)."""
        if not self.margin.binary:
            dx, done = sharded_softmax.backward(fwd, source, d_loss, sink, tf.constant(0), self.margin)
            return dx, [done]
        dx, done, db = binary.backward(fwd, source, d_loss, sink, tf.constant(0), self.margin)
        return dx, [done, self.margin.bias.assign_sub(lr * self.cluster.allreduce_sum(db))]

    def _gather_batch(self, embeddings, labels):
        """-> the global batch [B, D] float32 and each label's row in this shard [B] (-1: not here)."""
        x, y = self._validate_local(embeddings, labels)
        comm = self.cluster
        x_all = comm.allgather(x)  # [B, D]
        y_all = comm.allgather(y)  # [B]
        b_local = tf.shape(y)[0]
        checks = [
            tf.debugging.assert_equal(
                tf.shape(y_all)[0],
                comm.size * b_local,
                message=(
                    f"workers disagree on the local batch size: worker {comm.rank} has "
                    f"a batch whose size times the world size ({comm.size}) is not the "
                    "global batch; every worker must pass the same B_r"
                ),
            ),
            _assert_labels_in_range(y_all, self.num_classes),
        ]
        with tf.control_dependencies(checks):
            y_all = tf.identity(y_all)
        start, end = self.class_range
        owned = (y_all >= start) & (y_all < end)
        return x_all, tf.where(owned, tf.cast(y_all - start, tf.int32), -1)

    def _select_rows(self, local_label):
        """-> (sampled rows [g·K] or None for all, labels as positions among the classes taking part)."""
        if self.sample_rate == 1.0:
            return None, local_label
        classes = self._sample(local_label)
        g = self.rows_per_class
        index = tf.reshape(classes[:, None] * g + tf.range(g)[None, :], [-1])  # every row of each class
        self.sampled_index.assign(index)
        return index, tf.where(local_label >= 0, tf.searchsorted(classes, local_label, out_type=tf.int32), -1)

    def _sample(self, local_label: tf.Tensor) -> tf.Tensor:
        """[B] local labels (-1: not owned) -> [K] sorted local classes: all positives + random negatives."""
        rows = self.num_local_classes
        positives = tf.sort(tf.unique(tf.boolean_mask(local_label, local_label >= 0)).y)
        want = tf.maximum(max(1, int(self.sample_rate * rows)) - tf.size(positives), 0)
        by_draws = self.sample_rate <= DRAW_RATE
        negatives = sample_negatives(self.sampler, rows, positives, want, by_draws)
        return tf.sort(tf.concat([positives, negatives], 0))

    def _validate_local(self, embeddings, labels):
        x = tf.convert_to_tensor(embeddings)
        y = tf.convert_to_tensor(labels)
        if not x.dtype.is_floating:
            raise TypeError(f"embeddings must be a float tensor, got dtype {x.dtype.name}")
        if not y.dtype.is_integer:
            raise TypeError(f"labels must be int32 or int64 class indices, got dtype {y.dtype.name}")
        if x.shape.rank != 2 or (x.shape[1] is not None and x.shape[1] != self.embedding_dim):
            raise ValueError(f"embeddings must have shape [batch, {self.embedding_dim}], got {x.shape}")
        if y.shape.rank != 1:
            raise ValueError(f"labels must have shape [batch], got {y.shape}")
        if x.shape[0] is not None and y.shape[0] is not None and x.shape[0] != y.shape[0]:
            raise ValueError(f"embeddings have {x.shape[0]} rows but labels have {y.shape[0]}")
        if tf.executing_eagerly():  # precise, early message before any collective
            bad = np.flatnonzero((y.numpy() < 0) | (y.numpy() >= self.num_classes))
            if bad.size:
                raise ValueError(
                    f"label {int(y.numpy()[bad[0]])} at local batch position {bad[0]} "
                    f"is outside [0, {self.num_classes})"
                )
        # Softmax statistics are float32 whatever the backbone's dtype; the gradient casts back.
        return tf.cast(x, tf.float32), tf.cast(y, tf.int64)


# Rates up to this draw negatives as class ids (work in proportion to K); above, they take the
# top of one uniform score per class (work in proportion to C_r), where draws would repeat too often.
DRAW_RATE = 0.125


def sample_negatives(gen: tf.random.Generator, rows: int, positives, want, by_draws: bool) -> tf.Tensor:
    """`want` classes of [0, rows) drawn uniformly without replacement, none of the sorted [P]
    `positives` -> [want] int32 (order arbitrary)."""
    if not by_draws:
        return _negatives_by_scores(gen, rows, positives, want)
    drawn = _negatives_by_draws(gen, rows, positives, want)
    # too few distinct draws (rare: a small shard mostly positives): the per-class scores instead
    return tf.cond(tf.size(drawn) >= want, lambda: drawn, lambda: _negatives_by_scores(gen, rows, positives, want))


def _negatives_by_scores(gen, rows, positives, want) -> tf.Tensor:
    """The `want` largest of [rows] uniform scores, positives scored out -> [want]."""
    is_positive = tf.scatter_nd(positives[:, None], tf.ones_like(positives), [rows]) > 0
    scores = tf.where(is_positive, -1.0, gen.uniform([rows]))
    return tf.math.top_k(scores, want, sorted=False).indices


def _negatives_by_draws(gen, rows, positives, want) -> tf.Tensor:
    """2·want + 64 uniform draws from [0, rows) -> up to [want] of their distinct non-positive
    values in order of first appearance. The classes are exchangeable under the draws, so the
    first `want` of them are a uniformly random subset of the negatives."""
    draws = gen.uniform([2 * want + 64], 0, rows, dtype=tf.int64)  # 64 bits: no modulo bias
    fresh = tf.cast(tf.unique(draws).y, tf.int32)
    return tf.boolean_mask(fresh, ~_is_member(positives, fresh))[:want]


def _is_member(sorted_set, x) -> tf.Tensor:
    """[P] sorted, [N] -> [N] bool: x[i] in sorted_set (values of x below the sentinel 2^31 − 1)."""
    padded = tf.concat([sorted_set, [tf.int32.max]], 0)
    return tf.gather(padded, tf.searchsorted(padded, x)) == x


def _assert_labels_in_range(labels: tf.Tensor, num_classes: int):
    bad = (labels < 0) | (labels >= num_classes)
    return tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [
            f"labels must be in [0, {num_classes}); offending values:",
            tf.boolean_mask(labels, bad),
            "at global batch positions:",
            tf.where(bad)[:, 0],
        ],
        summarize=8,
    )
