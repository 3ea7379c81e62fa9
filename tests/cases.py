"""Shared test cases: global batches, margins, the class counts that split unevenly."""

from __future__ import annotations

import numpy as np

from partitioned_fc import margins as M
from partitioned_fc.sharding import all_shard_ranges

LOCAL_BATCH = 5
DIM = 16
IN_DIM = 6  # width of the inputs of the linear "backbone" used for the gradient convention

# Every margin of docs/margins.md with non-default parameters where that exercises more code.
MARGINS = {
    "softmax": M.Softmax(),
    "normface": M.NormFace(),
    "normface_s": M.NormFace(scale=16.0),
    "lsoftmax": M.LSoftmax(margin=4, lambda_=0.0),
    "lsoftmax3_lam": M.LSoftmax(margin=3, lambda_=2.0),
    "asoftmax": M.ASoftmax(margin=4, lambda_=0.0),
    "asoftmax_sched": M.ASoftmax(margin=4, lambda_=M.LambdaSchedule(1000.0, 0.12, 1.0, 5.0)),
    "amsoftmax": M.AMSoftmax(scale=30.0, margin=0.35),
    "cosface": M.CosFace(scale=64.0, margin=0.4),
    "arcface": M.ArcFace(scale=64.0, margin=0.5),
    "combined": M.CombinedMargin(scale=32.0, m1=1.2, m2=0.3, m3=0.1),
    # Inter-class filtering: thresholds low enough that some negatives of these batches are filtered
    "arcface_filtered": M.ArcFace(scale=64.0, margin=0.5, interclass_filtering_threshold=0.2),
    "normface_s_filtered": M.NormFace(scale=16.0, interclass_filtering_threshold=0.15),
    "curricularface": M.CurricularFace(scale=64.0, margin=0.5),
    "curricular_filtered": M.CurricularFace(scale=16.0, margin=0.3, interclass_filtering_threshold=0.3),
    "adaface": M.AdaFace(scale=64.0, margin=0.4, h=0.333),
    "magface": M.MagFace(scale=32.0, l_a=5.0, u_a=15.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
    "subcenter": M.SubCenterArcFace(scale=32.0, margin=0.5, k=3),
    "subcenter_filtered": M.SubCenterArcFace(scale=16.0, margin=0.3, k=2, interclass_filtering_threshold=0.2),
    "sphereface2": M.SphereFace2(scale=16.0, margin=0.4, lam=0.7, t=3.0, loss_weight=2.0),
    "sphereface2_filtered": M.SphereFace2(scale=8.0, margin=0.2, lam=0.6, t=2.0, interclass_filtering_threshold=0.3),
}
# Where each running statistic starts in the tests: not the papers' starts, so that an update is
# visible (t = 0) and AdaFace's ẑ is not clipped (σ = 100) for these batches (|x| ≈ 10).
STATE_START = {"t": 0.25, "batch_mean": 9.0, "batch_std": 3.0, "bias": -3.0}
LEARNED = ("bias",)  # state a training step moves by its gradient, not a running statistic


def reset_state(margin) -> None:
    """Put a margin's running statistics at STATE_START: each comparison starts from one state."""
    for name, var in margin.state().items():
        var.assign(STATE_START[name])


GRAPH_MARGINS = ("arcface", "asoftmax_sched", "softmax", "curricularface", "adaface", "subcenter", "sphereface2")
SAMPLED_MARGINS = ("arcface", "cosface", "softmax", "curricular_filtered", "magface", "subcenter", "sphereface2")
SAMPLE_RATE = 0.3
STEP = 7  # the training step fed to λ schedules


def class_rows(classes, g: int) -> np.ndarray:
    """Sorted class ids [K] -> their rows [g·K] of the [g·C, D] matrix (g rows per class, adjacent)."""
    return (np.asarray(classes)[:, None] * g + np.arange(g)).reshape(-1)


def row_range(class_range, g: int) -> tuple[int, int]:
    """A worker's classes (start, end) -> its rows (g·start, g·end)."""
    return g * class_range[0], g * class_range[1]


def class_counts(world_size: int) -> list[int]:
    """C values that do not divide evenly by the world size (and one tiny: 1 class more than N)."""
    return [37, world_size + 1]


# The fused train step at the tiny class count (N + 1: one or two classes a worker) for the cases
# whose edges it reaches (samples of a whole shard, chunks larger than a shard, sub-centers,
# learned and running state); every case runs at 37 classes.
TINY_TRAIN_CASES = (
    "arc_chunk_sgd",
    "cos_pfc_chunk_nesterov",
    "soft_pfc_adamw",
    "curricular_pfc_chunk",
    "adaface_pfc_chunk",
    "magface_full_adamw",
    "subcenter_pfc_chunk_nesterov",
    "sphereface2_pfc_chunk_adamw",
    "arc_pfc_chunk_bf16",
)


def train_class_counts(case_id: str, world_size: int) -> list[int]:
    """The class counts at which the fused-step case `case_id` runs (see TINY_TRAIN_CASES)."""
    counts = class_counts(world_size)
    return counts if case_id in TINY_TRAIN_CASES else counts[:1]


def global_batch(num_classes: int, world_size: int, seed: int = 0):
    """(inputs [B, IN_DIM], labels [B], backbone [IN_DIM, DIM]) with repeated labels and labels on
    every shard boundary of this world size."""
    rng = np.random.default_rng(seed + 1000 * num_classes + world_size)
    b = LOCAL_BATCH * world_size
    special = []
    for start, end in all_shard_ranges(num_classes, world_size):
        special += [start, end - 1]
    labels = rng.integers(0, num_classes, b)
    labels[: min(len(special), b - 2)] = special[: b - 2]
    labels[-1] = labels[0]  # a repeat
    rng.shuffle(labels)
    inputs = rng.normal(size=(b, IN_DIM)).astype(np.float32)
    backbone = rng.normal(size=(IN_DIM, DIM)).astype(np.float32)
    return inputs, labels.astype(np.int64), backbone


# Chunked logits under an autodiff tape (the fused train step covers the rest).
TAPE_CHUNK_MARGINS = (
    "arcface",
    "asoftmax_sched",
    "softmax",
    "normface",
    "curricularface",
    "arcface_filtered",
    "adaface",
    "magface",
    "subcenter",
    "subcenter_filtered",
    "sphereface2",
    "sphereface2_filtered",
)

# The fused train step: margin, sampling, chunking, optimizer, inside tf.function or eager.
TRAIN_CASES = [
    {
        "id": "arc_full_sgd",
        "margin": "arcface",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "weight_decay": 5e-4},
    },
    {
        "id": "arc_chunk_sgd",
        "margin": "arcface",
        "rate": 1.0,
        "chunk": 3,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "weight_decay": 5e-4},
    },
    {
        "id": "cos_pfc_chunk_nesterov",
        "margin": "cosface",
        "rate": SAMPLE_RATE,
        "chunk": 2,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
    },
    {
        "id": "soft_pfc_adamw",
        "margin": "softmax",
        "rate": SAMPLE_RATE,
        "chunk": None,
        "graph": False,
        "opt": "adamw",
        "opt_params": {"weight_decay": 0.01},
    },
    {
        "id": "sphere_chunk_adamw",
        "margin": "asoftmax_sched",
        "rate": 1.0,
        "chunk": 4,
        "graph": True,
        "opt": "adamw",
        "opt_params": {"beta_1": 0.8, "beta_2": 0.9, "weight_decay": 0.0},
    },
    {
        "id": "arc_pfc_chunk_bf16",
        "margin": "arcface",
        "rate": SAMPLE_RATE,
        "chunk": 3,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
        "dtype": "bfloat16",
    },
    {
        "id": "cos_fp16",
        "margin": "cosface",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
        "dtype": "float16",
    },
    {
        "id": "curricular_full_sgd",
        "margin": "curricularface",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "weight_decay": 5e-4},
    },
    {
        "id": "curricular_pfc_chunk",
        "margin": "curricularface",
        "rate": SAMPLE_RATE,
        "chunk": 2,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
    },
    {
        "id": "curricular_filtered_full_sgd",
        "margin": "curricular_filtered",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "weight_decay": 5e-4},
    },
    {
        "id": "curricular_filtered_pfc_chunk",
        "margin": "curricular_filtered",
        "rate": SAMPLE_RATE,
        "chunk": 2,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
    },
    {
        "id": "arcfilt_chunk_adamw",
        "margin": "arcface_filtered",
        "rate": 1.0,
        "chunk": 3,
        "graph": False,
        "opt": "adamw",
        "opt_params": {"weight_decay": 0.01},
    },
    {
        "id": "adaface_pfc_chunk",
        "margin": "adaface",
        "rate": SAMPLE_RATE,
        "chunk": 3,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
    },
    {
        "id": "magface_full_adamw",
        "margin": "magface",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "adamw",
        # epsilon 1e-6: one gradient entry of this batch is 1e-8 (at float32's noise level for its
        # row), where Adam's g / (|g| + 1e-8) turns a 1e-3 rounding difference into the update's.
        "opt_params": {"weight_decay": 0.01, "epsilon": 1e-6},
    },
    {
        "id": "curricular_pfc_bf16",
        "margin": "curricularface",
        "rate": SAMPLE_RATE,
        "chunk": 3,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
        "dtype": "bfloat16",
    },
    {
        "id": "subcenter_full_sgd",
        "margin": "subcenter",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "weight_decay": 5e-4},
    },
    {
        "id": "subcenter_pfc_chunk_nesterov",
        "margin": "subcenter",
        "rate": SAMPLE_RATE,
        "chunk": 2,
        "graph": True,
        # not the filtered head at s = 16: one step at lr 0.5 separates this batch, and the next
        # loss (3e-3) is a difference of O(10) float32 terms, below a relative 1e-5
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    },
    {
        "id": "sphereface2_full_sgd",
        "margin": "sphereface2",
        "rate": 1.0,
        "chunk": None,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9, "weight_decay": 5e-4},
    },
    {
        "id": "sphereface2_pfc_chunk_adamw",
        "margin": "sphereface2_filtered",
        "rate": SAMPLE_RATE,
        "chunk": 2,
        "graph": False,
        "opt": "adamw",
        "opt_params": {"weight_decay": 0.01, "epsilon": 1e-6},
    },
    {
        "id": "sphereface2_bf16",
        "margin": "sphereface2",
        "rate": 1.0,
        "chunk": 3,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
        "dtype": "bfloat16",
    },
    {
        "id": "subcenter_pfc_bf16",
        "margin": "subcenter",
        "rate": SAMPLE_RATE,
        "chunk": 3,
        "graph": True,
        "opt": "sgd",
        "opt_params": {"momentum": 0.9},
        "dtype": "bfloat16",
    },
]
assert set(TINY_TRAIN_CASES) <= {c["id"] for c in TRAIN_CASES}, "TINY_TRAIN_CASES names an unknown case"
