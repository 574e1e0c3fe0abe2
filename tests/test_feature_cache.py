"""The disk feature cache: what it streams back is what the prefix produced, in a seeded order per epoch."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer import feature_cache
from transfer.config import Strategy
from transfer.models import base_of, build_base, classifier, count_params, frozen_prefix
from transfer.strategies import freeze

IMAGES = 40  # labels are the image indices, so an image's record can be found in any order


def two_output_prefix(scale: float = 1.0) -> keras.Model:
    """A frozen prefix with two outputs of different shapes, as InceptionV3's strategy-2 prefix has six."""
    keras.utils.set_random_seed(0)
    images = keras.Input((6, 6, 3))
    x = keras.layers.Rescaling(scale)(images)
    maps = keras.layers.Conv2D(4, 3, padding="same")(x)
    vector = keras.layers.Dense(5)(keras.layers.Flatten()(x))
    return keras.Model(images, [maps, vector])


def build(tmp_path, prefix: keras.Model, monkeypatch) -> tuple[feature_cache.FeatureCache, dict]:
    monkeypatch.setattr(feature_cache, "SHARD_BYTES", 1000)  # about 4 records a shard: many shards
    rng = np.random.default_rng(1)
    data = {name: (rng.uniform(0, 1, (IMAGES, 6, 6, 3)).astype(np.float32), np.arange(IMAGES, dtype=np.int64))
            for name in ("train", "test")}
    datasets = {name: tf.data.Dataset.from_tensor_slices(pair).batch(7) for name, pair in data.items()}
    cache = feature_cache.build(prefix, datasets, {name: IMAGES for name in data}, tmp_path / "features")
    return cache, data


def collect(dataset: tf.data.Dataset) -> tuple[list[np.ndarray], np.ndarray]:
    outputs, labels = [], []
    for features, batch_labels in dataset:
        outputs.append([part.numpy() for part in features])
        labels.append(batch_labels.numpy())
    return [np.concatenate(parts) for parts in zip(*outputs)], np.concatenate(labels)


def test_streams_back_exactly_what_the_prefix_produced_in_float16(tmp_path, monkeypatch):
    prefix = two_output_prefix()
    cache, data = build(tmp_path, prefix, monkeypatch)
    assert len(cache.shards["train"]) > 4 and cache.dtype == np.float16
    assert cache.describe()["storage"] == "disk" and cache.describe()["dtype"] == "float16"
    expected = [output.numpy() for output in prefix(data["test"][0], training=False)]
    outputs, labels = collect(cache.dataset("test", 9))
    np.testing.assert_array_equal(labels, data["test"][1])  # in order, as int64
    assert labels.dtype == np.int64
    for got, want in zip(outputs, expected):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))


def test_a_prefix_with_one_output_streams_back_a_tensor_not_a_list(tmp_path, monkeypatch):
    """Strategy 1's prefix ends in the pooled features: one output, which the head takes as a tensor."""
    two = two_output_prefix()
    prefix = keras.Model(two.input, two.outputs[1])
    cache, data = build(tmp_path, prefix, monkeypatch)
    features, labels = next(iter(cache.dataset("test", 9)))
    assert isinstance(features, tf.Tensor) and features.shape == (9, 5)
    want = prefix(data["test"][0][:9], training=False).numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(features.numpy(), want)


def test_each_epoch_shuffles_by_its_seed_and_keeps_every_record(tmp_path, monkeypatch):
    prefix = two_output_prefix()
    cache, data = build(tmp_path, prefix, monkeypatch)
    expected = [output.numpy().astype(np.float16).astype(np.float32)
                for output in prefix(data["train"][0], training=False)]
    epochs = cache.epochs(batch_size=8, shuffle_buffer=10, seed=3)
    orders = {}
    for epoch in (0, 1):
        outputs, labels = collect(epochs(epoch))
        assert sorted(labels) == list(range(IMAGES))  # every record once
        for got, want in zip(outputs, expected):  # each record's features travel with its label
            np.testing.assert_array_equal(got, want[labels])
        orders[epoch] = labels
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], np.arange(IMAGES))
    np.testing.assert_array_equal(collect(epochs(0))[1], orders[0])  # a rerun of epoch 0
    np.testing.assert_array_equal(collect(cache.epochs(8, 10, seed=3)(1))[1], orders[1])  # a new run, epoch 1
    assert not np.array_equal(collect(cache.epochs(8, 10, seed=4)(0))[1], orders[0])


@pytest.mark.parametrize("scale", [1e6, 1e-9])
def test_features_beyond_float16_are_stored_in_float32(tmp_path, monkeypatch, capsys, scale):
    prefix = two_output_prefix(scale=scale)
    cache, data = build(tmp_path, prefix, monkeypatch)
    assert cache.dtype == np.float32 and "storing float32 instead" in capsys.readouterr().out
    outputs, _ = collect(cache.dataset("train", 16))
    np.testing.assert_array_equal(outputs[0], prefix(data["train"][0], training=False)[0].numpy())


def test_no_room_on_the_disk_says_how_much_is_needed(tmp_path, monkeypatch):
    prefix = two_output_prefix()
    assert feature_cache.room_for(prefix, 100, tmp_path / "a" / "features") is None
    monkeypatch.setattr(feature_cache, "DISK_MARGIN", 1 << 60)
    reason = feature_cache.room_for(prefix, 100, tmp_path / "features")
    assert reason.startswith(f"the feature cache needs 0.0 GiB of float16 in {tmp_path / 'features'}")
    assert "free" in reason


def test_a_killed_runs_leftover_is_deleted_before_the_free_disk_is_measured(tmp_path, monkeypatch):
    """A kill -9 leaves the cache behind; counted as used disk, it would push the next run onto the slow path."""
    import os
    import shutil

    leftover = tmp_path / "features" / "train-00000.bin"
    leftover.parent.mkdir()
    descriptor = os.open(leftover, os.O_CREAT | os.O_WRONLY)
    os.posix_fallocate(descriptor, 0, 1 << 30)  # 1 GiB really taken on the disk, at once
    os.close(descriptor)
    prefix = two_output_prefix()
    free = shutil.disk_usage(tmp_path).free
    # Room for the cache only once the leftover's 1 GiB is free again (512 MiB of slack for other writers).
    monkeypatch.setattr(feature_cache, "DISK_MARGIN", free + (512 << 20) - feature_cache.storage_bytes(prefix, 80))
    cache, _ = build(tmp_path, prefix, monkeypatch)
    assert cache.dtype == np.float16 and leftover.stat().st_size < 1 << 20  # a new shard in its place


def test_the_float32_fallback_measures_the_disk_again(tmp_path, monkeypatch, capsys):
    measured = []
    room_for = feature_cache.room_for

    def no_room_for_float32(prefix, images, folder, dtype=feature_cache.STORAGE_DTYPE):
        measured.append(dtype.name)  # the disk as it is, but with float32 taking just too much of it
        return room_for(prefix, images, folder, dtype) or ("no room for float32" if dtype.itemsize == 4 else None)

    monkeypatch.setattr(feature_cache, "room_for", no_room_for_float32)
    with pytest.raises(feature_cache.NoRoom, match="no room for float32"):
        build(tmp_path, two_output_prefix(scale=1e6), monkeypatch)
    assert measured == ["float16", "float32"] and "storing float32 instead" in capsys.readouterr().out
    assert not (tmp_path / "features").exists()  # nor the half-written float16 cache


def test_a_full_disk_while_caching_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    import resource

    from transfer.errors import PipelineError

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, hard))  # a real refusal by the kernel: EFBIG, as ENOSPC
    try:
        with pytest.raises(PipelineError) as refused:
            build(tmp_path, two_output_prefix(), monkeypatch)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(refused.value).startswith(f"no room to write {tmp_path / 'features'}: File too large (")
    assert "\n" not in str(refused.value) and not (tmp_path / "features").exists()


def test_the_cache_lives_where_dvc_never_tracks_it(tmp_path):
    import shutil
    import subprocess

    import yaml
    from helpers import ROOT

    from transfer.paths import feature_cache_folder

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outputs = [next(iter(out)) if isinstance(out, dict) else out for spec in stages.values()
               for kind in ("outs", "metrics", "plots") for out in spec.get(kind, [])]
    for stage in ("pretrain", "baseline", "finetune"):
        cache = feature_cache_folder(stage).as_posix()
        assert not [out for out in outputs if (cache + "/").startswith(out + "/") or out.startswith(cache + "/")]
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shutil.copy(ROOT / ".dvcignore", tmp_path / ".dvcignore")
    shard = (feature_cache_folder("finetune") / "train-00000.bin").as_posix()
    ignored = subprocess.run(["dvc", "check-ignore", shard], cwd=tmp_path, capture_output=True, text=True)
    assert ignored.returncode == 0 and ignored.stdout.strip() == shard


def test_a_disk_too_small_for_the_cache_trains_through_the_base_end_to_end(tmp_path, finished_project):
    """The finetune stage itself, with checkpoints/ (where the cache goes) on a 64 MiB tmpfs: less than
    DISK_MARGIN free, so the stage must say why, train through the base and still finish. Mounting needs root,
    which these machines and their CI have; elsewhere the test says so and the measurement tests above remain.
    Unlike them it notices the free space measured on another filesystem than the cache's (on / it fails)."""
    import json
    import subprocess

    from helpers import copy_project, run_stage, set_params

    project = copy_project(finished_project.project, tmp_path / "p")
    set_params(project / "params.yaml", {"strategy": 2, "finetune.epochs": 2})  # strategy 2 caches a prefix
    small_disk = project / "checkpoints"
    small_disk.mkdir(exist_ok=True)  # pretrain may have left its finished checkpoint: hidden under the mount
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small_disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 MiB tmpfs here ({mounted.stderr.strip()})")
    try:
        result = run_stage("finetune", project, check=True)
        left_on_the_small_disk = list(small_disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(small_disk)], check=True)
    folder = small_disk / "finetune" / "features"
    assert (f"finetune: the feature cache needs 0.0 GiB of float16 in {folder.relative_to(project)} and 1 GiB to "
            "spare, but only 0.1 GiB is free; training through the base instead") in result.stdout
    report = json.loads((project / "metrics/finetune.json").read_text())
    assert report["feature_cache"]["storage"] == "none"
    assert report["feature_cache"]["reason"].endswith("but only 0.1 GiB is free")
    assert report["epochs"] == 2 and (project / "models/finetuned.keras").is_file()
    assert left_on_the_small_disk == []  # no half-written cache, and the finished checkpoint is cleared


def test_the_cache_describes_itself_with_the_keys_of_not_cached(tmp_path, monkeypatch):
    prefix = two_output_prefix()
    cache, _ = build(tmp_path, prefix, monkeypatch)
    # A record: an int32 label, then 6*6*4 + 5 float16 features.
    assert cache.record_bytes == 4 + 2 * (6 * 6 * 4 + 5) == feature_cache.storage_bytes(prefix, 1)
    assert cache.bytes == 2 * IMAGES * cache.record_bytes
    assert cache.shapes == ((6, 6, 4), (5,)) and cache.counts == {"train": IMAGES, "test": IMAGES}
    assert [path.name for path in cache.shards["train"][:2]] == ["train-00000.bin", "train-00001.bin"]
    assert sum(path.stat().st_size for path in cache.shards["test"]) == IMAGES * cache.record_bytes
    assert all(path.stat().st_size == 3 * cache.record_bytes for path in cache.shards["test"][:-1])  # 1000 // 302
    described = cache.describe()
    assert described == {"storage": "disk", "dtype": "float16", "computed_in": "float32", "images": 2 * IMAGES,
                          "mib": round(cache.bytes / 2**20, 1), "seconds": round(cache.seconds, 1),
                          "reason": None}
    assert 0 < cache.seconds < 600 and described["mib"] == 0.0
    # At a size where the rounding shows: 10**6 records of 302 bytes are 288.0 MiB, 12.345 s read 12.3.
    large = dataclasses.replace(cache, counts={"train": 10**6}, seconds=12.345).describe()
    assert (large["images"], large["mib"], large["seconds"]) == (10**6, 288.0, 12.3)
    assert feature_cache.not_cached("why") == {**dict.fromkeys(described), "storage": "none", "images": 0,
                                               "mib": 0.0, "seconds": 0.0, "reason": "why"}


def test_inference_batches_hold_the_same_pixels_at_every_size():
    assert [feature_cache.inference_batch(size) for size in (32, 75, 150, 299, 5000)] == [703, 128, 32, 8, 1]


def test_room_for_says_what_it_needs_and_what_is_free(tmp_path, monkeypatch):
    import shutil

    prefix = two_output_prefix()
    assert feature_cache.storage_bytes(prefix, 1000, feature_cache.FALLBACK_DTYPE) == 1000 * (4 + 4 * 149)
    monkeypatch.setattr(feature_cache, "DISK_MARGIN", 3 << 30)
    huge = 10**9
    reason = feature_cache.room_for(prefix, huge, tmp_path / "f" / "g")
    needed = feature_cache.storage_bytes(prefix, huge)
    assert reason == (f"the feature cache needs {needed / 2**30:.1f} GiB of float16 in {tmp_path / 'f' / 'g'} and 3 "
                      f"GiB to spare, but only {shutil.disk_usage(tmp_path).free / 2**30:.1f} GiB is free")


def test_a_dataset_giving_other_than_its_count_is_refused(tmp_path):
    prefix = two_output_prefix()
    data = tf.data.Dataset.from_tensor_slices((np.zeros((5, 6, 6, 3), np.float32), np.arange(5))).batch(2)
    with pytest.raises(RuntimeError, match="feature cache: train gave 5 records, expected 6"):
        feature_cache.write(prefix, {"train": data}, {"train": 6}, tmp_path / "f", feature_cache.STORAGE_DTYPE)


def test_computing_in_bfloat16_keeps_the_weights_and_says_so(tmp_path):
    prefix = two_output_prefix()
    copy = feature_cache.computing_in(prefix, "mixed_bfloat16")
    assert {layer.compute_dtype for layer in copy.layers[1:]} == {"bfloat16"}
    assert {layer.compute_dtype for layer in prefix.layers[1:]} == {"float32"}
    for ours, theirs in zip(copy.get_weights(), prefix.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    data = tf.data.Dataset.from_tensor_slices((np.ones((3, 6, 6, 3), np.float32), np.arange(3))).batch(2)
    cache = feature_cache.build(prefix, {"train": data}, {"train": 3}, tmp_path / "f", bfloat16=True)
    assert cache.computed_in == "bfloat16" and cache.describe()["computed_in"] == "bfloat16"
    got = next(iter(cache.dataset("train", 3)))[0][1].numpy()
    want = prefix(np.ones((3, 6, 6, 3), np.float32))[1].numpy()
    assert not np.array_equal(got, want.astype(np.float16).astype(np.float32))  # computed in bfloat16
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


def small_classifier(trainable_base_layers: int | str) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = classifier(build_base("small_cnn", 32, "none"), "small_cnn", 5, 8, 0.5, base_training=False)
    freeze(base_of(model), Strategy(trainable_base_layers=trainable_base_layers), "small_cnn")
    return model


def test_plan_caches_the_frozen_prefix_when_wanted_and_there_is_room(tmp_path):
    """plan in the trainer's process (the stages reach it only in subprocesses, which mutation testing cannot
    see): each reason not to cache is the report's, and a killed run's leftover goes first whatever is decided."""
    folder = tmp_path / "features"
    for wanted, trains, reason in [(False, 0, "cache_features is off"),
                                   (True, "all", "the whole base trains: nothing is frozen to cache")]:
        folder.mkdir()
        (folder / "train-00000.bin").write_bytes(b"left by a killed run")
        cut, report = feature_cache.plan(small_classifier(trains), wanted, 100, folder, "finetune")
        assert cut is None and report == feature_cache.not_cached(reason) and not folder.exists()
    model = small_classifier(2)
    folder.mkdir()
    cut, report = feature_cache.plan(model, True, 100, folder, "finetune")
    assert report is None and not folder.exists()
    prefix, suffix = cut
    assert not prefix.trainable_weights and count_params(suffix.trainable_weights) == count_params(
        model.trainable_weights)


def test_plan_without_room_trains_through_the_base_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(feature_cache, "DISK_MARGIN", 1 << 60)
    model, images = small_classifier(2), 10**7  # enough images that the prefix's output needs whole GiB
    needed = feature_cache.storage_bytes(frozen_prefix(model)[0], images) / 2**30
    cut, report = feature_cache.plan(model, True, images, tmp_path / "features", "finetune")
    assert cut is None and report["storage"] == "none" and needed > 1
    folder = tmp_path / "features"
    assert report["reason"].startswith(f"the feature cache needs {needed:.1f} GiB of float16 in {folder}")
    assert capsys.readouterr().out == f"finetune: {report['reason']}; training through the base instead " \
                                      f"({feature_cache.SLOWER})\n"
