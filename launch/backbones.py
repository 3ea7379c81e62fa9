"""Face-embedding backbones (Keras 3): images [B, H, W, 3] float32 in [-1, 1] -> embeddings [B, D].

* `tiny`: three strided 3x3 convolutions and the embedding head; fast on a CPU at 32x32. With
  `batch_norm=False` it has no batch statistics at all, so a batch split over workers gives the
  same per-sample outputs and gradients as the whole batch on one worker.
* `mobilefacenet`: Chen et al., "MobileFaceNets" (2018): inverted-residual bottlenecks, a
  global depthwise convolution (GDConv) instead of pooling, a linear 1x1 convolution to D.
* `iresnet50` / `iresnet100`: the improved ResNet of InsightFace's ArcFace models (Deng et al.
  2019; Duta et al. 2020): units BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN plus a shortcut (1x1
  strided conv + BN where the shape changes), no activation after the sum; stages of
  [3, 4, 14, 3] / [3, 13, 30, 3] units, widths 64/128/256/512, each stage halving the map.

IResNet and tiny end in the InsightFace embedding head: BN, dropout, flatten, dense to D, BN
without scale (its bias stays). Batch norm uses InsightFace's momentum 0.9 (PyTorch 0.1) and
epsilon 1e-5. Every initializer gets its own seed derived from `seed`, so the same seed builds
the same weights in any process; layers have fixed names, so variable paths are stable.
"""

from __future__ import annotations

import itertools

import keras
from keras import layers

BACKBONES = ("tiny", "mobilefacenet", "iresnet50", "iresnet100")
# Keras dtype policies of the backbone: variables stay float32, "mixed_*" compute in 16 bits.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Smallest input side that leaves a >= 1 pixel map after the backbone's downsampling (4 halvings).
MIN_IMAGE_SIZE = {"tiny": 8, "mobilefacenet": 16, "iresnet50": 16, "iresnet100": 16}
IRESNET_UNITS = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
IRESNET_WIDTHS = (64, 128, 256, 512)
# MobileFaceNet's bottleneck groups (expansion t, output channels c, repeats n, first stride s).
MOBILEFACENET_GROUPS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

_BN = dict(momentum=0.9, epsilon=1e-5)


class _Seeds:
    """Distinct, reproducible integer seeds for the initializers of one model."""

    def __init__(self, seed: int):
        self._base = int(seed) * 100_003
        self._count = itertools.count()

    def __call__(self) -> int:
        return (self._base + next(self._count)) % (2**31 - 1)

    def he(self) -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=self())

    def glorot(self) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=self())


def from_config(cfg, precision: str = "float32") -> keras.Model:
    """The backbone a `launch.config.Config` describes (model section, image size, seed)."""
    m = cfg.model
    return build_backbone(
        m.backbone,
        cfg.data.image_size,
        m.embedding_dim,
        m.dropout,
        seed=cfg.seed,
        batch_norm=m.batch_norm,
        precision=precision,
    )


def build_backbone(
    name: str,
    image_size: int = 112,
    embedding_dim: int = 512,
    dropout: float = 0.0,
    seed: int = 0,
    batch_norm: bool = True,
    precision: str = "float32",
) -> keras.Model:
    """A Keras model [B, image_size, image_size, 3] float32 -> [B, embedding_dim] float32.

    batch_norm=False (tiny only) leaves out every batch normalization layer. precision: a Keras
    dtype policy of PRECISIONS; with "mixed_*" the layers compute in 16 bits on float32 variables
    and the embedding is cast back to float32 (the class matrix's loss is float32 anyway).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # the policy every layer built here takes
    try:
        model = _build(name, image_size, embedding_dim, dropout, seed, batch_norm)
    finally:
        keras.config.set_dtype_policy(previous)
    return model


def _build(name, image_size, embedding_dim, dropout, seed, batch_norm) -> keras.Model:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {list(BACKBONES)}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE[name]:
        raise ValueError(f"image_size for {name} must be an integer >= {MIN_IMAGE_SIZE[name]}, got {image_size!r}")
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not batch_norm and name != "tiny":
        raise ValueError(f"batch_norm=False is only supported by the tiny backbone, not {name!r}")
    seeds = _Seeds(seed)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
    if name == "tiny":
        x = _tiny_body(inputs, seeds, batch_norm)
        out = _embedding_head(x, embedding_dim, dropout, seeds, batch_norm)
    elif name == "mobilefacenet":
        out = _mobilefacenet(inputs, embedding_dim, dropout, seeds)
    else:
        x = _iresnet_body(inputs, IRESNET_UNITS[name], seeds)
        out = _embedding_head(x, embedding_dim, dropout, seeds, batch_norm=True)
    if out.dtype != "float32":
        out = layers.Activation("linear", dtype="float32", name="embedding_float32")(out)
    return keras.Model(inputs, out, name=name)


def unit_ends(model: keras.Model) -> list[str]:
    """Names of the layers that end the backbone's units, in order: the cuts of gradient
    checkpointing (launch/recompute.py). Each unit's only input is the previous unit's output;
    after the last one comes the embedding head."""
    if model.name == "tiny":
        return [f"conv{i}_prelu" for i in (1, 2, 3)]
    if model.name == "mobilefacenet":
        names = {layer.name for layer in model.layers}
        groups = enumerate(MOBILEFACENET_GROUPS, 1)
        blocks = [f"group{g}_block{i}" for g, (_, _, n, _) in groups for i in range(1, n + 1)]
        ends = [f"{b}_add" if f"{b}_add" in names else f"{b}_project_bn" for b in blocks]
        return ["stem_dw_prelu", *ends, "conv_512_prelu"]
    units = IRESNET_UNITS[model.name]
    return ["stem_prelu", *(f"stage{s}_unit{u}_add" for s, n in enumerate(units, 1) for u in range(1, n + 1))]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def _conv(x, filters: int, kernel: int, stride: int, seeds: _Seeds, name: str, bias: bool = False):
    """kxk convolution with PyTorch-style symmetric padding (k // 2 on every side)."""
    if kernel > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    return layers.Conv2D(
        filters, kernel, strides=stride, padding="valid", use_bias=bias, kernel_initializer=seeds.he(), name=name
    )(x)


def _dwconv(x, kernel: int | tuple[int, int], stride: int, seeds: _Seeds, name: str, pad: bool = True):
    if pad:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)  # only square kernels are padded
    return layers.DepthwiseConv2D(
        kernel, strides=stride, padding="valid", use_bias=False, depthwise_initializer=seeds.he(), name=name
    )(x)


def _bn(x, name: str, scale: bool = True):
    return layers.BatchNormalization(scale=scale, name=name, **_BN)(x)


def _prelu(x, name: str):
    """Per-channel PReLU (slopes shared over H and W), slopes starting at 0.25 as in PyTorch."""
    return layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name=name)(x)


def _embedding_head(x, embedding_dim: int, dropout: float, seeds: _Seeds, batch_norm: bool):
    """[B, h, w, c] -> [B, D]: BN, dropout, flatten, dense, BN without scale."""
    if batch_norm:
        x = _bn(x, "head_bn")
    if dropout > 0:
        x = layers.Dropout(dropout, seed=seeds(), name="head_dropout")(x)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.Dense(embedding_dim, use_bias=True, kernel_initializer=seeds.glorot(), name="head_dense")(x)
    if batch_norm:
        x = _bn(x, "embedding", scale=False)
    return x


# --------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------
def _tiny_body(x, seeds: _Seeds, batch_norm: bool):
    """Three 3x3 stride-2 convolutions (32, 64, 128 channels), each with (BN and) PReLU."""
    for i, width in enumerate((32, 64, 128), start=1):
        x = _conv(x, width, 3, 2, seeds, f"conv{i}", bias=not batch_norm)
        if batch_norm:
            x = _bn(x, f"conv{i}_bn")
        x = _prelu(x, f"conv{i}_prelu")
    return x


# --------------------------------------------------------------------------------------------
# IResNet
# --------------------------------------------------------------------------------------------
def _iresnet_unit(x, width: int, stride: int, seeds: _Seeds, name: str):
    shortcut = x
    if stride != 1 or x.shape[-1] != width:
        shortcut = _conv(x, width, 1, stride, seeds, f"{name}_down_conv")
        shortcut = _bn(shortcut, f"{name}_down_bn")
    y = _bn(x, f"{name}_bn1")
    y = _conv(y, width, 3, 1, seeds, f"{name}_conv1")
    y = _bn(y, f"{name}_bn2")
    y = _prelu(y, f"{name}_prelu")
    y = _conv(y, width, 3, stride, seeds, f"{name}_conv2")
    y = _bn(y, f"{name}_bn3")
    return layers.Add(name=f"{name}_add")([y, shortcut])


def _iresnet_body(x, units: tuple[int, ...], seeds: _Seeds):
    x = _conv(x, IRESNET_WIDTHS[0], 3, 1, seeds, "stem_conv")
    x = _bn(x, "stem_bn")
    x = _prelu(x, "stem_prelu")
    for s, (n, width) in enumerate(zip(units, IRESNET_WIDTHS), start=1):
        for u in range(1, n + 1):
            x = _iresnet_unit(x, width, 2 if u == 1 else 1, seeds, f"stage{s}_unit{u}")
    return x


# --------------------------------------------------------------------------------------------
# MobileFaceNet
# --------------------------------------------------------------------------------------------
def _bottleneck(x, expansion: int, width: int, stride: int, seeds: _Seeds, name: str):
    """Inverted residual: 1x1 expand + PReLU, 3x3 depthwise (stride) + PReLU, linear 1x1 project."""
    y = _conv(x, expansion * x.shape[-1], 1, 1, seeds, f"{name}_expand")
    y = _prelu(_bn(y, f"{name}_expand_bn"), f"{name}_expand_prelu")
    y = _dwconv(y, 3, stride, seeds, f"{name}_dw")
    y = _prelu(_bn(y, f"{name}_dw_bn"), f"{name}_dw_prelu")
    y = _conv(y, width, 1, 1, seeds, f"{name}_project")
    y = _bn(y, f"{name}_project_bn")
    if stride == 1 and x.shape[-1] == width:
        y = layers.Add(name=f"{name}_add")([y, x])
    return y


def _mobilefacenet(x, embedding_dim: int, dropout: float, seeds: _Seeds):
    x = _prelu(_bn(_conv(x, 64, 3, 2, seeds, "stem_conv"), "stem_bn"), "stem_prelu")
    x = _prelu(_bn(_dwconv(x, 3, 1, seeds, "stem_dw"), "stem_dw_bn"), "stem_dw_prelu")
    for g, (t, c, n, s) in enumerate(MOBILEFACENET_GROUPS, start=1):
        for i in range(1, n + 1):
            x = _bottleneck(x, t, c, s if i == 1 else 1, seeds, f"group{g}_block{i}")
    x = _prelu(_bn(_conv(x, 512, 1, 1, seeds, "conv_512"), "conv_512_bn"), "conv_512_prelu")
    # GDConv: a depthwise kernel as large as the map, one weight per position and channel.
    x = _bn(_dwconv(x, (x.shape[1], x.shape[2]), 1, seeds, "gdconv", pad=False), "gdconv_bn")
    if dropout > 0:
        x = layers.Dropout(dropout, seed=seeds(), name="head_dropout")(x)
    x = _conv(x, embedding_dim, 1, 1, seeds, "linear_conv")
    x = _bn(x, "embedding", scale=False)
    return layers.Flatten(name="head_flatten")(x)
