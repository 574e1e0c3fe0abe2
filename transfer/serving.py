"""The fine-tuned model for serving: a SavedModel that takes encoded images, and a TFLite file.

The SavedModel's `serving_default` signature takes a batch of encoded PNG or JPEG files (a string tensor) and
prepares each with images.prepare, the same function `cifar10-transfer predict` uses, so it answers as the
measured model does; it returns every class's probability, the class names and the most probable class.
Its `pixels` signature takes images already prepared (float32, 0-255, image_size square).

TFLite has no general image decoder, so the .tflite file takes what `pixels` takes: float32 images of
shape (batch, image_size, image_size, 3), pixel values 0-255, resized (and JPEG round-tripped) by the caller
as images.prepare does. It returns the probabilities; labels.txt beside it names the classes in order.

Both compute in float32 whatever precision the model trained in (training.mixed_precision): TFLite has no
float16 kernels for these ops (the converter refuses the model) and a CPU computes float16 far slower than
float32. The weights are the trained ones; the answers differ from the float16 evaluation by rounding only.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from transfer.images import prepare
from transfer.models import Description, computing_in, every_layer

SAVED_MODEL = "saved_model"
TFLITE_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "pixels"


def export(model: keras.Model, description: Description, folder: Path) -> None:
    """Write folder/saved_model, folder/model.tflite and folder/labels.txt, computing in float32."""
    if any(layer.compute_dtype != "float32" for layer in every_layer(model)):
        model = computing_in(model, "float32")
    write_saved_model(model, description, folder / SAVED_MODEL)
    (folder / TFLITE_FILE).write_bytes(tflite_model(folder / SAVED_MODEL))
    (folder / LABELS_FILE).write_text("".join(f"{name}\n" for name in description.classes))


def write_saved_model(model: keras.Model, description: Description, path: Path) -> None:
    storage, classes = description.storage, list(description.classes)
    size = storage.image_size

    def from_pixels(images):
        return {"probabilities": model(images, training=False)}

    def from_files(files):
        images = tf.map_fn(lambda data: prepare(data, storage), files,
                           fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
        probabilities = model(images, training=False)
        names = tf.constant(classes)
        return {
            "probabilities": probabilities,
            # One row of names per image: TF Serving's row format wants every output batched.
            "classes": tf.tile(names[tf.newaxis], [tf.shape(files)[0], 1]),
            "predicted_class": tf.gather(names, tf.argmax(probabilities, axis=1)),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_SIGNATURE, from_files, [tf.TensorSpec([None], tf.string, name="images")])
    archive.add_endpoint(PIXELS_SIGNATURE, from_pixels,
                         [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    archive.write_out(str(path), verbose=False)


def tflite_model(saved_model: Path) -> bytes:
    """The SavedModel's `pixels` signature as a float32 TFLite model (builtin ops only, no quantisation)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[PIXELS_SIGNATURE])
    return converter.convert()
