"""Image bytes as the schema stores them: JPEG, 3 channels, checked by decoding."""

from __future__ import annotations

import tensorflow as tf

from pipelines import schema

_JPEG_SOI = b"\xff\xd8\xff"


FITS = ("crop", "pad")  # how an image of another shape becomes the wanted one


def decode(data: bytes, where: str) -> tf.Tensor:
    """-> uint8 [H, W, 3]; an undecodable image raises DataError naming `where`."""
    try:
        return tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise schema.DataError(f"{where}: not a decodable image ({schema.first_line(e)})") from None


def resize_levels(images: tf.Tensor, size) -> tf.Tensor:
    """[..., H, W, 3] -> float32 [..., h, w, 3]: bilinear, rounded and clipped to uint8's 0..255
    levels. The one resize of the project: converters, the reader and the exported model use it,
    so a served image is resized exactly as a training one was."""
    return tf.clip_by_value(tf.round(tf.image.resize(tf.cast(images, tf.float32), size)), 0.0, 255.0)


def fit_square(img: tf.Tensor, fit: str) -> tf.Tensor:
    """[H, W, 3] -> [S, S, 3]: "crop" keeps the centred square of side min(H, W) (a face photo's
    centre, no distortion); "pad" puts the whole image in the centre of a black square of side
    max(H, W)."""
    h, w = int(img.shape[0]), int(img.shape[1])
    side = min(h, w) if fit == "crop" else max(h, w)
    return tf.image.resize_with_crop_or_pad(img, side, side)


def as_jpeg(
    data: bytes, where: str, size: tuple[int, int] | None = None, quality: int = 95, fit: str = "crop"
) -> tuple[bytes, tuple[int, int]]:
    """Check that `data` decodes; return (JPEG bytes, (height, width)).

    JPEGs of the wanted size pass through byte for byte; other formats (PNG, BMP, GIF) and other
    sizes are decoded, made square per `fit` when `size` is square and the image is not, resized
    to `size` and re-encoded. An undecodable image raises DataError naming `where`.
    """
    img = decode(data, where)
    hw = (int(img.shape[0]), int(img.shape[1]))
    if data[:3] == _JPEG_SOI and (size is None or hw == tuple(size)):
        return bytes(data), hw
    if size is not None and hw != tuple(size):
        if size[0] == size[1] and hw[0] != hw[1]:
            img = fit_square(img, fit)
        img = tf.cast(resize_levels(img, size), tf.uint8)
        hw = tuple(size)
    return tf.io.encode_jpeg(img, quality=quality).numpy(), hw
