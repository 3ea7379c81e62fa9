"""launch.backbones: shapes, parameter counts, seeded init, batch independence, gradient flow."""

import numpy as np
import pytest
import tensorflow as tf

from launch.backbones import build_backbone


def images(n: int, size: int, seed: int = 0) -> tf.Tensor:
    return tf.random.stateless_uniform([n, size, size, 3], [seed, 1], -1.0, 1.0)


@pytest.mark.parametrize(
    "name,size,dim", [("tiny", 32, 64), ("mobilefacenet", 32, 128), ("iresnet50", 16, 32), ("iresnet100", 16, 32)]
)
def test_output_shape(name, size, dim):
    model = build_backbone(name, image_size=size, embedding_dim=dim, seed=0)
    out = model(images(2, size), training=False)
    assert out.shape == (2, dim) and out.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy()))


@pytest.mark.parametrize(
    "name,dim,low,high",
    [
        ("iresnet50", 512, 43.0e6, 44.2e6),  # published: 43.6M
        ("iresnet100", 512, 64.5e6, 65.8e6),  # published: 65.2M
        ("mobilefacenet", 128, 0.9e6, 1.1e6),  # published: 0.99M
    ],
)
def test_parameter_counts_at_112(name, dim, low, high):
    model = build_backbone(name, image_size=112, embedding_dim=dim)
    assert model.output_shape == (None, dim)
    assert low <= model.count_params() <= high, model.count_params()


def test_iresnet_structure():
    model = build_backbone("iresnet50", image_size=112, embedding_dim=512)
    units = {layer.name.rsplit("_", 1)[0] for layer in model.layers if layer.name.endswith("_add")}
    assert [sum(u.startswith(f"stage{s}_") for u in units) for s in range(1, 5)] == [3, 4, 14, 3]
    assert model.get_layer("stage4_unit3_add").output.shape[1:] == (7, 7, 512)
    assert not model.get_layer("embedding").scale  # the last BN has a bias but no scale


def test_same_seed_same_weights_other_seed_different():
    a = build_backbone("tiny", 32, 64, seed=3)
    b = build_backbone("tiny", 32, 64, seed=3)
    c = build_backbone("tiny", 32, 64, seed=4)
    for va, vb in zip(a.weights, b.weights):
        assert va.path == vb.path
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    kernels = [(va.numpy(), vc.numpy()) for va, vc in zip(a.weights, c.weights) if "kernel" in va.path]
    assert kernels and all(not np.array_equal(x, y) for x, y in kernels)
    # Different layers of one model get different draws.
    k1 = a.get_layer("conv2").kernel.numpy().ravel()
    k2 = a.get_layer("conv3").kernel.numpy().ravel()[: k1.size]
    assert not np.allclose(k1, k2)


def test_tiny_without_batch_norm_is_independent_of_the_batch_split():
    x = images(8, 32, seed=5)
    plain = build_backbone("tiny", 32, 64, seed=1, batch_norm=False)
    assert not [layer for layer in plain.layers if "batch_norm" in type(layer).__name__.lower()]
    whole = plain(x, training=True)
    halves = tf.concat([plain(x[:4], training=True), plain(x[4:], training=True)], axis=0)
    np.testing.assert_allclose(whole.numpy(), halves.numpy(), rtol=1e-5, atol=1e-6)
    # With batch statistics the split changes the result: the property above is not trivial.
    with_bn = build_backbone("tiny", 32, 64, seed=1)
    whole = with_bn(x, training=True)
    halves = tf.concat([with_bn(x[:4], training=True), with_bn(x[4:], training=True)], axis=0)
    assert np.max(np.abs(whole.numpy() - halves.numpy())) > 1e-3


@pytest.mark.parametrize(
    "name,size,kwargs",
    [
        ("tiny", 32, {}),
        ("tiny", 32, {"batch_norm": False}),
        ("tiny", 32, {"dropout": 0.3}),
        ("mobilefacenet", 32, {"dropout": 0.2}),
        ("iresnet50", 32, {}),
    ],
)
def test_gradients_reach_every_trainable_variable(name, size, kwargs):
    model = build_backbone(name, image_size=size, embedding_dim=16, seed=0, **kwargs)
    x = images(4, size, seed=2)
    target = tf.random.stateless_normal([4, 16], [7, 7])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) * target)
    grads = tape.gradient(loss, model.trainable_variables)
    for var, g in zip(model.trainable_variables, grads):
        assert g is not None, var.path
        g = tf.convert_to_tensor(g).numpy()
        assert np.all(np.isfinite(g)) and np.any(g != 0), var.path


def test_training_updates_batch_norm_statistics():
    model = build_backbone("tiny", 32, 8, seed=0)
    mean = model.get_layer("conv1_bn").moving_mean
    before = mean.numpy().copy()
    model(images(4, 32), training=True)
    assert not np.allclose(before, mean.numpy())


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(name="resnet18"), "unknown backbone"),
        (dict(name="iresnet50", image_size=8), "image_size for iresnet50 must be an integer >= 16"),
        (dict(name="tiny", embedding_dim=0), "embedding_dim must be"),
        (dict(name="tiny", dropout=1.0), "dropout must be"),
        (dict(name="mobilefacenet", batch_norm=False), "only supported by the tiny backbone"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(**{"image_size": 32, **args})
