"""Image bytes as the schema stores them: JPEG, 3 channels, checked by decoding."""
from __future__ import annotations

import tensorflow as tf

from pipelines import schema

_JPEG_SOI = b"\xff\xd8\xff"


def as_jpeg(data: bytes, where: str, size: tuple[int, int] | None = None,
            quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """Check that `data` decodes; return (JPEG bytes, (height, width)).

    JPEGs of the wanted size pass through byte for byte; other formats (PNG, BMP, GIF) and other
    sizes are decoded, resized to `size` and re-encoded. An undecodable image raises DataError
    naming `where`.
    """
    try:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise schema.DataError(f"{where}: not a decodable image ({schema.first_line(e)})") from None
    hw = (int(img.shape[0]), int(img.shape[1]))
    if data[:3] == _JPEG_SOI and (size is None or hw == tuple(size)):
        return bytes(data), hw
    if size is not None and hw != tuple(size):
        img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, size)), 0, 255), tf.uint8)
        hw = tuple(size)
    return tf.io.encode_jpeg(img, quality=quality).numpy(), hw
