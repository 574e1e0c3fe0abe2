"""Resizing against an independent reference, at 75 and 299 px: the preprocess stage against Pillow's bilinear
resize called directly, and `prepare` against the stage, byte for byte (so against Pillow too), on the tiny
archive's 20 target test images (32x32 uint8 in CIFAR-10's python layout; colour plus noise, so every pixel
differs from its neighbours); and on real CIFAR-10 images (the shared copy beside the checkout), `prepare` and
the stage's `resize` against Pillow and against each other.

At 32 px (the other tests' size) the stage skips resizing, so only these tests see it at work."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import make_project, run_stage, set_params
from PIL import Image  # Pillow comes with matplotlib, a dependency of the project

from transfer.cifar10 import read_archive
from transfer.images import Storage, prepare, resize
from transfer.records import dataset, open_split

# Pillow resizes in two passes (rows, then columns) and rounds to 8 bits between them; TensorFlow interpolates in
# float32 and rounds once. Both are bilinear with pixel centres at +0.5 and edge pixels repeated, so they can
# round a pixel differently: one level apart at most (about 18% of the pixels here). A resize that is not
# that bilinear, or shifted by half a pixel, differs by tens of levels on these noisy images.
PILLOW_LEVELS = 1
SHARED_COPY = Path(__file__).resolve().parents[2] / "shared/datasets/cifar-10-python.tar.gz"


@pytest.fixture(scope="module")
def split_project(tmp_path_factory, tiny_archive) -> Path:
    """A project after the download and split stages, which resizing does not touch."""
    project = make_project(tmp_path_factory.mktemp("resize") / "split", tiny_archive, git=False)
    for stage in ("download", "split"):
        run_stage(stage, project, check=True)
    return project


@pytest.fixture(scope="module")
def preprocessed(split_project, tmp_path_factory) -> Callable[[int, str], tuple[Storage, np.ndarray, np.ndarray]]:
    """(size, encoding) -> (the records' storage, the target test images as the split stage stored them, the
    images the preprocess stage stored for them), preprocessing a copy of `split_project` once per setting."""
    made = {}

    def preprocess(size: int, encoding: str) -> tuple[Storage, np.ndarray, np.ndarray]:
        if (size, encoding) not in made:
            project = tmp_path_factory.mktemp("resize") / f"{size}-{encoding}"
            shutil.copytree(split_project, project)
            set_params(project / "params.yaml", {"preprocess.image_size": size, "preprocess.encoding": encoding})
            run_stage("preprocess", project, check=True)
            split = open_split(project / "data/tfrecords", "target", "test")
            assert (split.image_size, split.encoding) == (size, encoding)
            assert len(split.files) == 1  # so the records are in index order, the order of the split's images
            stored = np.concatenate([images.numpy() for images, _ in dataset(split, 64)])
            originals = np.load(project / "data/split/target/test_images.npy")
            assert originals.shape == (20, 32, 32, 3) and stored.shape == (20, size, size, 3)
            made[size, encoding] = split.storage, originals, stored
        return made[size, encoding]

    return preprocess


def pillow_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Pillow's bilinear resize. Its antialiasing (always on) and TensorFlow's (off in images.resize_tensor)
    only widen the filter when shrinking; 32 px to 75 or 299 grows the image, so neither applies."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("size", [75, 299])
def test_the_preprocess_stage_resizes_as_pillow_does(preprocessed, size):
    _, originals, stored = preprocessed(size, "raw")  # raw: JPEG's loss would hide the resize
    reference = np.stack([pillow_bilinear(image, size) for image in originals]).astype(np.int16)
    difference = np.abs(stored.astype(np.int16) - reference)
    assert difference.max() <= PILLOW_LEVELS, f"{np.count_nonzero(difference > PILLOW_LEVELS)} pixels differ"


@pytest.mark.parametrize(("size", "encoding"), [(75, "raw"), (299, "raw"), (299, "jpeg")])
def test_prepare_gives_the_stored_image_bit_for_bit(preprocessed, size, encoding):
    storage, originals, stored = preprocessed(size, encoding)
    prepared = np.stack([prepare(tf.io.encode_png(image), storage).numpy() for image in originals])
    assert prepared.dtype == np.float32
    np.testing.assert_array_equal(prepared, stored)


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    """The first 4 test images of each class of the real CIFAR-10 (40 images, 32x32 uint8)."""
    if not SHARED_COPY.exists():
        pytest.skip(f"no shared copy of CIFAR-10 at {SHARED_COPY}")
    cifar = read_archive(SHARED_COPY)
    chosen = np.concatenate([np.flatnonzero(cifar.test_labels == c)[:4] for c in range(10)])
    return cifar.test_images[chosen]


@pytest.mark.parametrize("size", [75, 299])
def test_real_cifar10_images_are_resized_as_pillow_does_by_the_stage_and_by_prepare(real_images, size):
    stage = resize(real_images, size)  # what the preprocess stage stores (raw)
    reference = np.stack([pillow_bilinear(image, size) for image in real_images]).astype(np.int16)
    difference = np.abs(stage.astype(np.int16) - reference)
    assert difference.max() <= PILLOW_LEVELS, f"{np.count_nonzero(difference > PILLOW_LEVELS)} pixels differ"
    storage = Storage(image_size=size, encoding="raw", jpeg_quality=95)
    prepared = np.stack([prepare(tf.io.encode_png(image), storage).numpy() for image in real_images])
    np.testing.assert_array_equal(prepared, stage)  # the same bytes for the same image, either way in
