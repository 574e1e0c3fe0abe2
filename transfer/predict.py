"""Classify image files with a saved classifier, each image prepared exactly as the pipeline stored its own.

The model file says what its outputs mean and how its training images were stored (transfer/models.py's
Description), so a copied or downloaded model needs nothing else; images.prepare turns any PNG or JPEG into
the image the model would have seen had the preprocess stage stored it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from transfer.errors import PipelineError, tensorflow_reason
from transfer.images import prepare
from transfer.models import Description, load_model, read_description

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder contributes; a file named on its own may be called anything
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG
BATCH = 64  # images per inference call


@dataclass(frozen=True)
class Prediction:
    path: Path
    label: str  # the most probable class
    probability: float
    probabilities: dict[str, float]  # every class, in the model's output order


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the PNG and JPEG files under each folder named (sorted); every one checked to be
    a PNG or JPEG by its first bytes, so that a wrong file is named before any work."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PipelineError(f"{path}: no PNG or JPEG files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PipelineError(f"{path}: no such file or folder")
    for file in files:
        try:
            with file.open("rb") as stream:
                start = stream.read(8)
        except OSError as error:
            raise PipelineError(f"{file}: cannot read it ({error.strerror})") from None
        if not start.startswith(SIGNATURES):
            raise PipelineError(f"{file}: not a PNG or JPEG image")
    return files


def load_classifier(path: Path) -> tuple[keras.Model, Description]:
    """A .keras file the finetune stage saved (or a copy of one), and its description."""
    if not path.is_file():
        raise PipelineError(f"{path}: model not found (run the finetune stage with `dvc repro`, or give --model)")
    model = load_model(path, made_by="finetune")
    return model, read_description(path)


def predict(model: keras.Model, description: Description, files: list[Path]) -> Iterator[Prediction]:
    """Predictions for `files`, in their order, BATCH images at a time."""
    classes = description.classes
    for start in range(0, len(files), BATCH):
        batch = files[start:start + BATCH]
        images = tf.stack([_prepared(file, description) for file in batch])
        probabilities = np.asarray(model(images, training=False), dtype=np.float64)
        for file, row in zip(batch, probabilities):
            best = int(row.argmax())
            yield Prediction(file, classes[best], float(row[best]), dict(zip(classes, row.tolist())))


def _prepared(file: Path, description: Description) -> tf.Tensor:
    try:
        return prepare(tf.constant(file.read_bytes()), description.storage)
    except OSError as error:
        raise PipelineError(f"{file}: cannot read it ({error.strerror})") from None
    except tf.errors.OpError as error:
        raise PipelineError(f"{file}: not a readable PNG or JPEG image ({tensorflow_reason(error.message)})") from None
