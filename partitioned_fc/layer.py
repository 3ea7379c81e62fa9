"""`PartitionedFC`: the model-parallel classification layer and its exact margin loss."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

import cluster as cluster_lib
from partitioned_fc import margins as margins_lib
from partitioned_fc.sharded_softmax import sharded_cross_entropy
from partitioned_fc.sharding import init_rows, shard_range


class PartitionedFC(tf.Module):
    """The `[C, D]` class matrix split by rows over the workers, and the exact global loss.

    Each worker owns the contiguous classes `class_range = (start, end)` and stores them in
    `weight` (`tf.Variable [end - start, D]`). Calling the layer with this worker's
    embeddings `[B_r, D]` and labels `[B_r]` (int32/int64; every worker the same B_r) returns the
    margin softmax loss averaged over the GLOBAL batch `B = Σ B_r`, identical on every worker.

    Its gradient w.r.t. `weight` is exact (nobody else holds these rows); its gradient w.r.t. the
    local embeddings is exact for the global mean loss, so a data-parallel backbone must SUM its
    gradients over workers (not average them).

    Args:
      num_classes: C. embedding_dim: D.
      margin: a `partitioned_fc.margins.Margin` (default ArcFace).
      cluster: a `cluster.Cluster` (default `cluster.init()`).
      seed: the initial matrix is N(0, 0.01²) drawn from `seed`; for the same seed the union of
        the shards is the same [C, D] matrix at every world size.
      sample_rate: Partial FC (An et al.). Below 1, each call keeps every owned class that is a
        label in the global batch and fills up to max(1, int(sample_rate · C_r)) classes with
        uniformly sampled negatives (seeded, reproducible); logits, softmax and gradient use only
        those rows, whose local indices are left in `sampled_index`. 1.0 is the full layer.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: margins_lib.Margin | None = None,
                 cluster: cluster_lib.Cluster | None = None, seed: int = 0, sample_rate: float = 1.0,
                 name: str | None = None):
        super().__init__(name=name or "partitioned_fc")
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        if margin is not None and not isinstance(margin, margins_lib.Margin):
            raise TypeError(f"margin must be a partitioned_fc.margins.Margin, got {type(margin).__name__}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.margin = margin if margin is not None else margins_lib.ArcFace()
        self.cluster = cluster if cluster is not None else cluster_lib.init()
        self.seed = int(seed)
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self.class_range = shard_range(self.num_classes, self.cluster.size, self.cluster.rank)
        rows = self.class_range[1] - self.class_range[0]
        with self.name_scope:
            self.weight = tf.Variable(tf.zeros([rows, self.embedding_dim]), name="weight")
            # Drives λ schedules (SphereFace); the training loop advances it.
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            if self.sample_rate < 1.0:
                # Negative sampling: a per-shard stream, part of the checkpointed state.
                self.sampler = tf.random.Generator.from_seed(
                    self.seed * 1_000_003 + self.class_range[0], alg="philox")
                self.sampled_index = tf.Variable(tf.zeros([0], tf.int32), trainable=False,
                                                 shape=tf.TensorShape([None]), name="sampled_index")
        init_rows(self.weight, self.class_range[0], self.seed)

    @property
    def num_local_classes(self) -> int:
        return self.class_range[1] - self.class_range[0]

    def get_config(self) -> dict:
        return {"num_classes": self.num_classes, "embedding_dim": self.embedding_dim,
                "margin": self.margin.get_config(), "seed": self.seed, "sample_rate": self.sample_rate}

    @classmethod
    def from_config(cls, config: dict, cluster: cluster_lib.Cluster | None = None) -> "PartitionedFC":
        config = dict(config)
        config["margin"] = margins_lib.from_config(config["margin"])
        return cls(cluster=cluster, **config)

    def __call__(self, embeddings, labels, *, step=None, return_accuracy: bool = False):
        """[B_r, D] float, [B_r] int -> scalar loss (and [] top-1 accuracy if return_accuracy)."""
        x, y = self._validate_local(embeddings, labels)
        comm = self.cluster
        x_all = comm.allgather(x)                                  # [B, D]
        y_all = comm.allgather(y)                                  # [B]
        b_local = tf.shape(y)[0]
        checks = [
            tf.debugging.assert_equal(
                tf.shape(y_all)[0], comm.size * b_local,
                message=(f"workers disagree on the local batch size: worker {comm.rank} has "
                         f"a batch whose size times the world size ({comm.size}) is not the "
                         "global batch; every worker must pass the same B_r")),
            _assert_labels_in_range(y_all, self.num_classes),
        ]
        with tf.control_dependencies(checks):
            y_all = tf.identity(y_all)
        start, end = self.class_range
        owned = (y_all >= start) & (y_all < end)
        local_label = tf.where(owned, tf.cast(y_all - start, tf.int32), -1)

        if self.sample_rate == 1.0:
            weight = tf.convert_to_tensor(self.weight)
        else:
            index = self._sample(local_label)
            self.sampled_index.assign(index)
            weight = tf.gather(self.weight, index)  # [K, D]; its gradient reaches only these rows
            local_label = tf.where(local_label >= 0,
                                   tf.searchsorted(index, local_label, out_type=tf.int32), -1)
        per_sample, correct = sharded_cross_entropy(
            comm, x_all, weight, local_label, self.margin, self.step if step is None else step)
        loss = tf.reduce_mean(per_sample)
        if return_accuracy:
            return loss, tf.reduce_mean(correct)
        return loss

    def _sample(self, local_label: tf.Tensor) -> tf.Tensor:
        """[B] local labels (-1: not owned) -> [K] sorted local rows: all positives + random negatives."""
        rows = self.num_local_classes
        owned = tf.boolean_mask(local_label, local_label >= 0)
        positive = tf.scatter_nd(owned[:, None], tf.ones_like(owned), [rows]) > 0
        scores = tf.where(positive, 2.0, self.sampler.uniform([rows]))  # positives sort first
        k = tf.maximum(max(1, int(self.sample_rate * rows)),
                       tf.reduce_sum(tf.cast(positive, tf.int32)))
        return tf.sort(tf.math.top_k(scores, k, sorted=False).indices)

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
                raise ValueError(f"label {int(y.numpy()[bad[0]])} at local batch position {bad[0]} "
                                 f"is outside [0, {self.num_classes})")
        return tf.cast(x, self.weight.dtype), tf.cast(y, tf.int64)


def _assert_labels_in_range(labels: tf.Tensor, num_classes: int):
    bad = (labels < 0) | (labels >= num_classes)
    return tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [f"labels must be in [0, {num_classes}); offending values:", tf.boolean_mask(labels, bad),
         "at global batch positions:", tf.where(bad)[:, 0]], summarize=8)
