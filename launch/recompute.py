"""Gradient checkpointing of the backbone: keep only each unit's input, recompute the rest.

`model.gradient_checkpointing: true` (docs/config.md) cuts the backbone at the ends of its units
(`backbones.unit_ends`: each residual unit of IResNet, each bottleneck of MobileFaceNet, each
convolution block of tiny), as InsightFace's `using_ckpt` does per residual block. In the forward
each unit keeps only its input; in the backward it runs again under a tape to get its gradients.
Memory of the activations drops from every layer's output to one tensor per unit plus one unit's
activations; compute grows by about one more forward of the body. The embedding head (with its
dropout, whose random draws would differ on a second run) is never recomputed.

Batch normalization in training mode updates its moving statistics in every call; the recompute
puts them back, so they advance once per step, as without checkpointing. The recompute waits for
the unit's output gradient, so a graph executor cannot hoist it into the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

Forward = Callable[[tf.Tensor], tf.Tensor]


class CheckpointedBackbone:
    """The same model, its units recomputed in the backward: images [B, H, W, 3] -> [B, D].

    Shares every variable with `model` (nothing is copied): saving, export and evaluation keep
    using `model`; only the training forward goes through this object.
    """

    def __init__(self, model: keras.Model, unit_ends: Sequence[str]):
        if not unit_ends:
            raise ValueError(f"{model.name}: no unit ends to checkpoint at")
        cuts = [model.inputs[0], *(model.get_layer(name).output for name in unit_ends)]
        self.units = [keras.Model(a, b, name=f"{model.name}_unit{i}") for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        self.head = keras.Model(cuts[-1], model.outputs[0], name=f"{model.name}_head")

    def __call__(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        x = images
        for unit in self.units:
            x = recomputed(unit)(x) if training else unit(x, training=False)
        return self.head(x, training=training)


def recomputed(unit: keras.Model) -> Forward:
    """`unit` in training mode [B, ...] -> [B, ...], whose backward recomputes its activations."""
    stats = list(unit.non_trainable_variables)  # batch-norm moving statistics

    @tf.custom_gradient
    def run(x):
        def grad(dy, variables=None):
            return _recompute_grads(unit, stats, x, dy, variables or [])

        return unit(x, training=True), grad

    return run


def _recompute_grads(unit, stats, x, dy, variables):
    """-> (d x, [d v for v in variables]) of `unit` at x, by a second forward; stats restored."""
    with tf.control_dependencies([dy]):  # not before the backward reaches this unit
        x = tf.identity(x)
        saved = [tf.identity(v.value) for v in stats]
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = unit(x, training=True)
    dx, *dv = tape.gradient(y, [x, *variables], output_gradients=dy)
    with tf.control_dependencies([y]):
        restore = [v.assign(s) for v, s in zip(stats, saved)]
    with tf.control_dependencies(restore):
        return tf.identity(dx), dv
