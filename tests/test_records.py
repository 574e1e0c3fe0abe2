"""TFRecord shards: round trip, sharding and damaged shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from helpers import last_line, make_project, run_stage

from transfer.errors import PipelineError
from transfer.records import check_shards, dataset, epochs, labels_of, open_split
from transfer.sharding import MIN_IMAGES_PER_SHARD, shard_count
from transfer.training import labelled_subset


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, tiny_archive):
    """A project whose data went through download, split and preprocess at 40 px JPEG.

    Its shard size, 100 bytes, is smaller than one image (about 300 bytes).
    """
    project = make_project(tmp_path_factory.mktemp("records") / "p", tiny_archive,
                           {"preprocess.image_size": 40, "preprocess.encoding": "jpeg",
                            "preprocess.shard_size_mb": 0.0001}, git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    return project


@pytest.fixture(scope="module")
def raw(tmp_path_factory, tiny_archive):
    """A project preprocessed at the archive's own 32 px, raw: the records hold the split's exact pixels."""
    project = make_project(tmp_path_factory.mktemp("raw") / "p", tiny_archive, {"preprocess.encoding": "raw"},
                           git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    return project


def pairs(data) -> list[tuple[bytes, int]]:
    """The (image, label) pairs a dataset yields, in its order; images as their uint8 bytes."""
    return [(image.astype(np.uint8).tobytes(), int(label))
            for images, labels in data for image, label in zip(images.numpy(), labels.numpy())]


def split_pairs(project, task: str, name: str, keep: np.ndarray | None = None) -> list[tuple[bytes, int]]:
    """The split's (image, label) pairs as the split stage wrote them, those in `keep` only, sorted."""
    images = np.load(project / f"data/split/{task}/{name}_images.npy")
    labels = np.load(project / f"data/split/{task}/{name}_labels.npy")
    indices = range(len(labels)) if keep is None else np.flatnonzero(keep)
    return sorted((images[index].tobytes(), int(labels[index])) for index in indices)


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


def test_raw_encoding_is_lossless(raw):
    for task, name in (("target", "test"), ("source", "train")):
        split = open_split(raw / "data/tfrecords", task, name)
        yielded = pairs(dataset(split, batch_size=64))
        assert len(yielded) == split.count
        assert sorted(yielded) == split_pairs(raw, task, name)  # each image with its own label


def test_labelled_subset_yields_exactly_its_images_balanced_and_seeded(raw):
    """What training reads through a labelled subset: those images and labels, per_class of each class."""
    split = open_split(raw / "data/tfrecords", "target", "train")
    labels = labels_of(split)
    assert np.bincount(labels).tolist() == [11] * 5
    read = {}
    for seed in (1, 2):
        keep = labelled_subset(labels, 3, seed=seed)
        expected = split_pairs(raw, "target", "train", keep)
        read_epochs = epochs(split, 4, shuffle_buffer=64, seed=seed, keep=keep)
        for epoch in (0, 1):  # the second epoch reads the cached subset
            yielded = pairs(read_epochs(epoch))
            assert sorted(yielded) == expected
            assert np.bincount([label for _, label in yielded]).tolist() == [3] * 5
        assert sorted(pairs(dataset(split, 5, keep=keep))) == expected
        read[seed] = expected
    again = labelled_subset(labels, 3, seed=1)
    assert sorted(pairs(dataset(split, 4, keep=again))) == read[1]  # same seed, same images
    assert read[1] != read[2]  # another seed, other images


def test_meta_describes_the_records(preprocessed):
    meta = json.loads((preprocessed / "data/tfrecords/meta.json").read_text())
    assert meta["image_size"] == 40 and meta["encoding"] == "jpeg"
    assert meta["classes"]["target"] == ["dog", "frog", "horse", "ship", "truck"]
    # 11 of the 12 images per class; one went to val
    assert sum(shard["count"] for shard in meta["splits"]["target/train"]["shards"]) == 55


def test_shuffling_is_seeded_and_subset_is_respected(preprocessed):
    split = open_split(preprocessed / "data/tfrecords", "source", "train")
    order = lambda seed: np.concatenate([y.numpy() for _, y in dataset(split, 5, shuffle_buffer=100, seed=seed)])  # noqa: E731
    assert np.array_equal(order(1), order(1))
    keep = np.zeros(split.count, dtype=bool)
    keep[:10] = True
    assert sum(len(y) for _, y in dataset(split, 4, keep=keep)) == 10


def test_shuffle_order_depends_on_seed_and_epoch_only(raw):
    split = open_split(raw / "data/tfrecords", "source", "train")
    plain = pairs(dataset(split, 8))
    order = lambda seed, epoch: pairs(epochs(split, 8, shuffle_buffer=64, seed=seed)(epoch))  # noqa: E731
    first = order(1, 0)
    assert sorted(first) == sorted(plain) == split_pairs(raw, "source", "train")  # the same pairs, reordered
    assert first != plain
    assert first == order(1, 0)
    assert first != order(2, 0)  # another seed
    assert first != order(1, 1)  # another epoch
    # Epoch 2 of a run that read epochs 0 and 1 is epoch 2 of a run resumed there.
    read_epochs = epochs(split, 8, shuffle_buffer=64, seed=1)
    pairs(read_epochs(0))
    pairs(read_epochs(1))
    assert pairs(read_epochs(2)) == order(1, 2) != order(1, 1)


def test_shard_count_targets_shard_size():
    assert shard_count(22_500, 299, "jpeg", 100) == 4
    assert shard_count(22_500, 32, "raw", 100) == 1
    assert shard_count(60_000, 299, "raw", 100) == 161
    # 1 KB shards of 3 KB images: not 4,608 shards for 1,500 images, but shards of at least the minimum
    assert shard_count(1_500, 32, "raw", 0.001) == 1_500 // MIN_IMAGES_PER_SHARD
    assert shard_count(5, 32, "raw", 0.001) == 1


def test_tiny_shard_size_writes_no_empty_shard(preprocessed):
    records = preprocessed / "data/tfrecords"
    meta = json.loads((records / "meta.json").read_text())
    listed = set()
    for task in ("source", "target"):
        for name in ("train", "val", "test"):
            split = open_split(records, task, name)
            counts = [sum(1 for _ in tf.data.TFRecordDataset(str(path))) for path in split.files]
            assert counts == [shard["count"] for shard in meta["splits"][f"{task}/{name}"]["shards"]]
            assert sum(counts) == split.count
            assert min(counts) >= min(split.count, MIN_IMAGES_PER_SHARD), (task, name, counts)
            check_shards(split)
            listed.update(split.files)
    assert set(records.glob("*/*.tfrecord")) == listed  # no shard that meta.json does not list


def test_a_damaged_meta_stops_a_training_stage_with_one_line_naming_it(tmp_path, preprocessed):
    """The stage's side of test_records_in_process's damaged meta.json cases: one line, no traceback."""
    project = tmp_path / "p"
    shutil.copytree(preprocessed, project)
    meta = project / "data/tfrecords/meta.json"
    meta.write_text(meta.read_text()[:40])
    result = run_stage("pretrain", project)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last_line(result).startswith("error: data/tfrecords/meta.json is damaged"), result.stderr


def test_truncated_shard_is_named(tmp_path, preprocessed):
    records = tmp_path / "tfrecords"
    shutil.copytree(preprocessed / "data/tfrecords", records)
    split = open_split(records, "target", "train")
    damaged = split.files[0]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(PipelineError, match=f"TFRecord shard {damaged} is truncated or corrupt"):
        check_shards(split)


def with_index(shard, record: int, index: int) -> None:
    """Rewrite `shard` with its record number `record` claiming split index `index`."""
    examples = [tf.train.Example.FromString(data.numpy()) for data in tf.data.TFRecordDataset(str(shard))]
    examples[record].features.feature["index"].int64_list.value[:] = [index]
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for example in examples:
            writer.write(example.SerializeToString())


@pytest.mark.parametrize("index", ["count", -1])
def test_a_record_index_outside_the_split_is_named(tmp_path, raw, index):
    """Such an index was an IndexError traceback in labels_of, or (negative) silently some other record's label."""
    records = tmp_path / "tfrecords"
    shutil.copytree(raw / "data/tfrecords", records)
    split = open_split(records, "target", "train")
    index = split.count if index == "count" else index
    with_index(split.files[-1], 2, index)
    with pytest.raises(PipelineError) as error:
        labels_of(split)
    assert str(error.value) == (f"TFRecord shard {split.files[-1]} holds a record of index {index}, outside "
                                f"0..{split.count - 1} (meta.json says {split.count} records); delete "
                                "data/tfrecords and rerun `dvc repro`")


def test_a_record_index_missing_from_the_split_is_named(tmp_path, raw):
    records = tmp_path / "tfrecords"
    shutil.copytree(raw / "data/tfrecords", records)
    split = open_split(records, "target", "train")
    first = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(str(split.files[0])))).numpy())
    missing = first.features.feature["index"].int64_list.value[0]
    with_index(split.files[0], 0, (missing + 1) % split.count)  # two records claim one index, none this one
    with pytest.raises(PipelineError) as error:
        labels_of(split)
    assert str(error.value) == (f"{records}/target/train: no record has index {missing} of 0..{split.count - 1}; "
                                "delete data/tfrecords and rerun `dvc repro`")


def test_a_full_disk_in_the_shard_writers_is_one_line_and_leaves_nothing(tmp_path, tiny_archive):
    """TensorFlow's error from a worker process ("<shard>; File too large") was a traceback."""
    import resource

    project = make_project(tmp_path / "p", tiny_archive, {"preprocess.encoding": "raw", "preprocess.workers": 2},
                           git=False)
    for stage in ("download", "split"):
        run_stage(stage, project, check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # a real refusal by the kernel: EFBIG, as ENOSPC
    try:  # the stage and its worker processes inherit the limit; a shard of 16 or more images is 50 KB
        result = run_stage("preprocess", project)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last_line(result) == (f"error: no room to write data/tfrecords: File too large (free disk space under "
                                 f"{(project / 'data').resolve()} and rerun)")
    assert sorted(path.name for path in (project / "data").iterdir()) == ["cifar-10-python.tar.gz", "split"]


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
