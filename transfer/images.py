"""The image contract: how the pipeline stores an image, and how any new image is made the same.

The preprocess stage resizes each image (`resize`, bilinear in TensorFlow ops) and stores it raw or as JPEG
(`encode`); every reader decodes it with `decode`. `prepare` applies that very path to a PNG or JPEG of any
size, so `cifar10-transfer predict` and the exported serving graph give a model what it was trained on.
TensorFlow is imported inside the functions: preprocess worker processes import this module fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf


@dataclass(frozen=True)
class Storage:
    """How the preprocess stage stored images, so what a model trained on them saw: resized to image_size, then
    kept raw or as JPEG at jpeg_quality. Models carry it (transfer/models.py) so that new images get the same."""

    image_size: int
    encoding: str
    jpeg_quality: int


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, h, w, 3) -> uint8 (N, size, size, 3), bilinear."""
    if images.shape[1:3] == (size, size):
        return images
    return resize_tensor(images, size).numpy()


def resize_tensor(images: tf.Tensor, size: int) -> tf.Tensor:
    """resize in TensorFlow ops, so that a serving graph resizes exactly as the preprocess stage did.

    Bilinear with pixel centres at +0.5, antialias off (tf.image.resize's default): antialiasing only widens the
    filter when shrinking, so CIFAR-10's 32 px grown to 75 or 299 is the same either way (tests/test_resize.py
    checks it against Pillow's bilinear resize); a larger image given to `prepare` is shrunk without it."""
    import tensorflow as tf

    resized = tf.image.resize(tf.cast(images, tf.float32), (size, size), method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def encode(image: np.ndarray, encoding: str, quality: int) -> bytes:
    if encoding == "raw":
        return image.tobytes()
    return _jpeg(image, quality).numpy()


def _jpeg(image, quality: int) -> tf.Tensor:
    """The pipeline's one JPEG encoder: records and the images served to a model go through the same settings."""
    import tensorflow as tf

    return tf.io.encode_jpeg(image, quality=quality)


def decode(encoded: tf.Tensor, encoding: str, size: int) -> tf.Tensor:
    """A stored record's image bytes -> uint8 (size, size, 3), as every reader of the records decodes them."""
    import tensorflow as tf

    if encoding == "raw":
        return tf.reshape(tf.io.decode_raw(encoded, tf.uint8), (size, size, 3))
    return tf.ensure_shape(tf.io.decode_jpeg(encoded, channels=3), (size, size, 3))


def prepare(data: tf.Tensor, storage: Storage) -> tf.Tensor:
    """Encoded PNG or JPEG bytes of any size -> the float32 (size, size, 3) image a model trained on `storage` saw.

    Exactly the preprocess stage's path: decoded to RGB, resized by `resize_tensor` (as `resize` is), through
    the storage encoding (a JPEG round trip at its quality) and decoded as the training reader decodes
    records. An original CIFAR-10 image given as PNG therefore becomes bit for bit the image its record
    holds. TensorFlow ops only: the exported serving graph calls this very function.
    """
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = resize_tensor(image[tf.newaxis], storage.image_size)[0]
    if storage.encoding == "jpeg":
        image = decode(_jpeg(image, storage.jpeg_quality), "jpeg", storage.image_size)
    return tf.cast(image, tf.float32)
