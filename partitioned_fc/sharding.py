"""How the C class rows are split over N workers, and how a shard is initialised.

Split (docs/margins.md, the same as InsightFace and PLSC): worker r owns the contiguous rows
[start_r, start_r + C_r) with C_r = C // N + (r < C % N) and start_r = r·(C // N) + min(r, C % N).
"""

from __future__ import annotations

import tensorflow as tf

from partitioned_fc.memory import release_free_memory

# Rows are drawn in fixed blocks keyed by (seed, block index), independent of the world size, so
# the union of the shards is the single-worker matrix for any N.
INIT_BLOCK_ROWS = 8192
INIT_STDDEV = 0.01


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, end) of the class rows worker `rank` owns."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} is smaller than the world size {world_size}: "
            "every worker must own at least one class"
        )
    base, rem = divmod(num_classes, world_size)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


def all_shard_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    return [shard_range(num_classes, world_size, r) for r in range(world_size)]


def owner_of(class_index: int, num_classes: int, world_size: int) -> int:
    """The rank that owns class `class_index`."""
    base, rem = divmod(num_classes, world_size)
    big = rem * (base + 1)  # rows held by the first `rem` workers, one larger each
    if class_index < big:
        return class_index // (base + 1)
    return rem + (class_index - big) // base


def init_rows(variable: tf.Variable, start: int, seed: int, stddev: float = INIT_STDDEV) -> None:
    """Fill `variable` ([rows, D]) with rows start.. of the seeded N(0, stddev²) matrix [C, D],
    block by block (`write_rows`): no full-size temporary, so a shard of millions of rows fits."""
    rows, dim = variable.shape
    end = start + rows
    block = INIT_BLOCK_ROWS

    def blocks():
        for b in range(start // block, (end - 1) // block + 1):
            b_start = b * block
            values = tf.random.stateless_normal([block, dim], seed=[seed, b], stddev=stddev, dtype=tf.float32)
            lo, hi = max(start, b_start), min(end, b_start + block)
            yield lo - start, values[lo - b_start : hi - b_start]

    write_rows(variable, blocks())


def write_rows(variable: tf.Variable, blocks) -> None:
    """Write blocks (first row, values [n, ...]) into `variable` in place, cast to its dtype.

    Rows are written with a scatter: a sliced `assign` first reads the variable densely, and
    writing while that read is alive copies the whole shard (measured: out of memory at 10M).
    At the end the blocks' freed pages go back to the OS, else they stay resident next to the
    shard (partitioned_fc.memory).
    """
    for lo, values in blocks:
        values = tf.cast(values, variable.dtype)
        variable.scatter_update(tf.IndexedSlices(values, tf.range(lo, lo + values.shape[0])))
    release_free_memory()


def full_matrix(num_classes: int, dim: int, seed: int, stddev: float = INIT_STDDEV) -> tf.Tensor:
    """The whole [C, D] initial matrix (what a single worker gets). For tests and small C."""
    v = tf.Variable(tf.zeros([num_classes, dim]))
    init_rows(v, 0, seed, stddev)
    return tf.convert_to_tensor(v)
