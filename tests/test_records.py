"""TFRecord shards: round trip, sharding and damaged shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import last_line, make_project, run_stage

from transfer.errors import PipelineError
from transfer.records import check_shards, dataset, labels_of, open_split, shard_count


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, tiny_archive):
    """A project whose data went through download, split and preprocess at 40 px JPEG."""
    project = make_project(tmp_path_factory.mktemp("records") / "p", tiny_archive,
                           {"preprocess.image_size": 40, "preprocess.encoding": "jpeg",
                            "preprocess.shard_size_mb": 0.01}, git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    return project


def test_round_trip_shapes_dtypes_labels(preprocessed):
    split = open_split(preprocessed / "data/tfrecords", "source", "train")
    assert split.image_size == 40 and split.encoding == "jpeg" and len(split.files) > 1
    images, labels = [], []
    for batch_images, batch_labels in dataset(split, batch_size=7):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (split.count, 40, 40, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255
    expected = np.load(preprocessed / "data/split/source/train_labels.npy")
    assert sorted(labels.tolist()) == sorted(expected.tolist())
    assert np.array_equal(labels_of(split), expected)  # indexed by position in the split


def test_raw_encoding_is_lossless(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"preprocess.encoding": "raw"}, git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    split = open_split(project / "data/tfrecords", "target", "test")
    images = np.concatenate([x.numpy() for x, _ in dataset(split, batch_size=64)])
    original = np.load(project / "data/split/target/test_images.npy").astype(np.float32)
    flat = [sorted(map(bytes, array.reshape(len(array), -1))) for array in (images, original)]
    assert flat[0] == flat[1]


def test_meta_describes_the_records(preprocessed):
    meta = json.loads((preprocessed / "data/tfrecords/meta.json").read_text())
    assert meta["image_size"] == 40 and meta["encoding"] == "jpeg"
    assert meta["classes"]["target"] == ["dog", "frog", "horse", "ship", "truck"]
    # 11 of 12 per class; 1 went to val
    assert sum(shard["count"] for shard in meta["splits"]["target/train"]["shards"]) == 55


def test_shuffling_is_seeded_and_subset_is_respected(preprocessed):
    split = open_split(preprocessed / "data/tfrecords", "source", "train")
    order = lambda seed: np.concatenate([y.numpy() for _, y in dataset(split, 5, shuffle_buffer=100, seed=seed)])  # noqa: E731
    assert np.array_equal(order(1), order(1))
    keep = np.zeros(split.count, dtype=bool)
    keep[:10] = True
    assert sum(len(y) for _, y in dataset(split, 4, keep=keep)) == 10


def test_shard_count_targets_shard_size():
    assert shard_count(22_500, 299, "jpeg", 100) == 4
    assert shard_count(22_500, 32, "raw", 100) == 1
    assert shard_count(60_000, 299, "raw", 100) == 161


def test_truncated_shard_is_named(tmp_path, preprocessed):
    import shutil

    records = tmp_path / "tfrecords"
    shutil.copytree(preprocessed / "data/tfrecords", records)
    split = open_split(records, "target", "train")
    damaged = split.files[0]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(PipelineError, match=f"TFRecord shard {damaged} is truncated or corrupt"):
        check_shards(split)


def test_finetune_names_a_corrupt_shard(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    shard = sorted((project / "data/tfrecords/target").glob("val-*"))[0]
    data = bytearray(shard.read_bytes())
    data[20:40] = b"\xff" * 20
    shard.write_bytes(bytes(data))
    result = run_stage("finetune", project)
    assert result.returncode == 1
    assert f"TFRecord shard data/tfrecords/target/{shard.name} is truncated or corrupt" in last_line(result)
    assert "Traceback" not in result.stderr


def test_inception_refuses_small_images(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"model.backbone": "inception_v3"}, git=False)
    result = run_stage("preprocess", project)
    assert "preprocess.image_size=32 is too small for inception_v3" in last_line(result)


def test_tf_is_used_for_reading(preprocessed):
    # The readers hand TensorFlow tensors to Keras, not numpy copies.
    split = open_split(preprocessed / "data/tfrecords", "source", "val")
    images, labels = next(iter(dataset(split, 3)))
    assert isinstance(images, tf.Tensor) and labels.dtype == tf.int64
