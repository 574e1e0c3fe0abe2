"""The records' public functions called in the test's own process on a few images (test_records.py checks the
preprocess stage's shards, written in a subprocess that mutation testing cannot see).

Each image's label is its index in the split, so every record read back names the image it must hold."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from transfer import records
from transfer.errors import PipelineError
from transfer.images import Storage, decode, encode, prepare, resize
from transfer.sharding import ShardJob, cpu_count, plan_shards, shard_count, shard_name, write_all, write_shard

COUNT = 40  # images in the split
SHARDS = (0, 13, 26, 40)  # three shards, of unequal sizes
IMAGES = np.random.default_rng(7).integers(0, 256, (COUNT, 32, 32, 3), dtype=np.uint8)


def write_split(root: Path, size: int = 32, encoding: str = "raw", quality: int = 95, meta: dict | None = None,
                bounds: tuple[int, ...] = SHARDS):
    """Shards of IMAGES (label = index) as the preprocess stage writes them, and their meta.json."""
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "_images.npy", IMAGES)
    np.save(root / "_labels.npy", np.arange(COUNT))
    shards = []
    for shard, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        name = shard_name("train", shard, len(bounds) - 1)
        job = ShardJob(root / "_images.npy", root / "_labels.npy", start, stop, root / "target" / name,
                               size, encoding, quality)
        job.destination.parent.mkdir(exist_ok=True)
        assert write_shard(job) == stop - start
        shards.append({"file": f"target/{name}", "count": stop - start})
    meta = meta or {"image_size": size, "encoding": encoding, "jpeg_quality": quality,
                    "classes": {"target": ["a", "b"]}, "splits": {"target/train": {"count": COUNT, "shards": shards}}}
    (root / records.META_FILE).write_text(json.dumps(meta))
    return records.open_split(root, "target", "train")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("raw"))


def read(data) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images, labels, batch sizes) of one pass."""
    batches = list(data.as_numpy_iterator())
    return (np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches]),
            [len(labels) for _, labels in batches])


def test_shard_names_sort_in_order_and_say_how_many():
    assert shard_name("train", 3, 12) == "train-00003-of-00012.tfrecord"


def test_shard_count_aims_at_the_shard_size_with_16_images_at_least():
    assert shard_count(10_000, 32, "raw", 10) == 4  # 30.72 MB in shards of 10 MB
    assert shard_count(10_000, 299, "jpeg", 10) == 17  # 169.9 MB at 0.19 bytes a pixel
    assert shard_count(100, 32, "raw", 0.001) == 6  # 100 // 16, not 308
    assert shard_count(10, 32, "raw", 0.001) == 1
    assert shard_count(32, 32, "raw", 0.001) == 2


def test_the_split_is_read_back_whole_and_exact(raw):
    assert (raw.count, raw.image_size, raw.encoding, raw.classes, raw.task, raw.name) == (
        COUNT, 32, "raw", ("a", "b"), "target", "train")
    assert raw.storage == Storage(32, "raw", 95)
    records.check_shards(raw)
    images, labels, sizes = read(records.dataset(raw, 16))
    assert sorted(labels) == list(range(COUNT)) and labels.dtype == np.int64
    assert images.dtype == np.float32 and sizes == [16, 16, 8]
    np.testing.assert_array_equal(images, IMAGES[labels].astype(np.float32))
    np.testing.assert_array_equal(records.labels_of(raw), np.arange(COUNT))


def test_every_shard_is_read_interleaved_in_a_fixed_order(raw):
    first = read(records.dataset(raw, 7))[1]
    assert list(first[:6]) == [0, 13, 26, 1, 14, 27]  # one record of each shard in turn
    np.testing.assert_array_equal(read(records.dataset(raw, 7))[1], first)


def test_at_most_four_shards_are_read_at_once(tmp_path):
    """Six shards: records come from the first four in turn; the fifth starts only where one of them ends."""
    split = write_split(tmp_path / "six", bounds=(0, 1, 8, 15, 22, 29, 40))
    labels = list(read(records.dataset(split, 64))[1])
    assert labels[:4] == [0, 1, 8, 15]  # shard 0 holds one record
    assert labels[4:8] == [2, 9, 16, 22]  # shard 4 took its place in the cycle
    assert labels.index(29) > 20 and sorted(labels) == list(range(COUNT))  # shard 5 once three more ended


def test_shuffling_depends_on_the_seed_and_the_epoch_only(raw):
    epochs = records.epochs(raw, 8, shuffle_buffer=COUNT, seed=3)
    orders = [read(epochs(epoch))[1] for epoch in (0, 1, 0)]
    assert sorted(orders[0]) == list(range(COUNT))
    assert list(orders[0]) != list(orders[1]) and list(orders[0]) == list(orders[2])
    again = records.epochs(raw, 8, shuffle_buffer=COUNT, seed=3)(1)
    np.testing.assert_array_equal(read(again)[1], orders[1])
    other_seed = read(records.epochs(raw, 8, shuffle_buffer=COUNT, seed=4)(1))[1]
    assert list(other_seed) != list(orders[1])
    np.testing.assert_array_equal(read(records.dataset(raw, 8, shuffle_buffer=COUNT, seed=3))[1], orders[0])
    twice = epochs(1)
    np.testing.assert_array_equal(read(twice)[1], read(twice)[1])  # one epoch's data, read again: the same order
    assert list(read(records.dataset(raw, 8))[1]) != list(orders[0])  # no buffer, no shuffle


def test_epoch_seed_is_the_first_word_of_the_seed_sequence():
    assert records.epoch_seed(3, 1) == int(np.random.SeedSequence([3, 1]).generate_state(1)[0])
    assert len({records.epoch_seed(seed, epoch) for seed in (0, 1) for epoch in (0, 1)}) == 4


def test_a_labelled_subset_yields_exactly_its_images(raw):
    keep = np.zeros(COUNT, dtype=bool)
    keep[[0, 5, 13, 30, 39]] = True
    epochs = records.epochs(raw, 2, shuffle_buffer=8, seed=1, keep=keep)
    for epoch in (0, 1):
        data = epochs(epoch)
        assert data.cardinality().numpy() == 3
        images, labels, sizes = read(data)
        assert sorted(labels) == [0, 5, 13, 30, 39] and sizes == [2, 2, 1]
        np.testing.assert_array_equal(images, IMAGES[labels].astype(np.float32))
    assert records.dataset(raw, 16).cardinality().numpy() == 3
    assert sorted(read(records.dataset(raw, 2, keep=keep))[1]) == [0, 5, 13, 30, 39]


def test_shards_of_resized_jpeg_images_hold_what_prepare_gives(tmp_path):
    split = write_split(tmp_path / "jpeg", size=48, encoding="jpeg", quality=80)
    images, labels, _ = read(records.dataset(split, 64))
    assert images.shape == (COUNT, 48, 48, 3)
    storage = Storage(48, "jpeg", 80)
    assert split.storage == storage
    for label in labels[:3]:
        png = tf.io.encode_png(IMAGES[label]).numpy()
        np.testing.assert_array_equal(prepare(png, storage).numpy(), images[list(labels).index(label)])
    # The JPEG round trip stays near the resized pixels, and a lower quality moves them further.
    resized = resize(IMAGES[labels], 48).astype(np.float32)
    error = np.abs(images - resized).mean()
    assert 0 < error < 40  # random pixels are JPEG's worst case
    low = decode(encode(resize(IMAGES[:1], 48)[0], "jpeg", 10), "jpeg", 48).numpy()
    assert np.abs(low - resized[list(labels).index(0)]).mean() > error


def test_resize_keeps_images_of_the_size_and_resizes_others_bilinearly():
    assert resize(IMAGES, 32) is IMAGES
    small = resize(IMAGES[:2], 16)
    assert small.shape == (2, 16, 16, 3) and small.dtype == np.uint8
    # Halving with bilinear weights (no antialias) samples between pixel pairs: the mean of each 2x2 block,
    # rounded half to even as tf.round does (float32 arithmetic may land a half the other way).
    pairs = IMAGES[:2].astype(np.float64).reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    difference = np.abs(small.astype(np.int64) - np.round(pairs).astype(np.int64))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99
    tiny = np.full((1, 2, 2, 3), 255, dtype=np.uint8)
    assert resize(tiny, 4).max() == 255  # clipped and rounded, never wrapped to 0


def test_raw_encoding_round_trips_bit_for_bit():
    image = IMAGES[0, :5, :5]
    encoded = encode(image, "raw", 95)
    assert encoded == image.tobytes()
    np.testing.assert_array_equal(decode(encoded, "raw", 5).numpy(), image)


def test_prepare_of_a_raw_storage_is_the_resized_image():
    png = tf.io.encode_png(IMAGES[3]).numpy()
    np.testing.assert_array_equal(prepare(png, Storage(32, "raw", 95)).numpy(), IMAGES[3])
    np.testing.assert_array_equal(prepare(png, Storage(16, "raw", 95)).numpy(),
                                  resize(IMAGES[3:4], 16)[0])
    assert prepare(png, Storage(16, "raw", 95)).dtype == tf.float32


def test_jpeg_quality_is_the_one_given():
    """A lower quality is a smaller file (and a coarser image, above): the setting reaches the encoder."""
    sizes = [len(encode(IMAGES[0], "jpeg", quality)) for quality in (10, 50, 95)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[2] / 2


def test_an_animated_gif_is_prepared_as_its_first_frame():
    """The serving graph takes any image bytes TensorFlow decodes: a GIF's first frame is the image, not a stack."""
    import io

    from PIL import Image  # Pillow comes with matplotlib, a dependency of the project

    frames = [Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE, colors=64) for image in IMAGES[:2]]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(Image.open(io.BytesIO(gif.getvalue())).convert("RGB"))
    storage = Storage(48, "raw", 95)
    np.testing.assert_array_equal(prepare(gif.getvalue(), storage).numpy(),
                                  prepare(tf.io.encode_png(first).numpy(), storage).numpy())


@pytest.mark.parametrize("storage", [Storage(32, "raw", 95), Storage(48, "jpeg", 80)])
def test_prepare_makes_grey_and_transparent_pngs_rgb(storage):
    """What `predict` and the serving graph get is not always RGB: a grey PNG is taken as its grey in all three
    channels, an RGBA one without its alpha (JPEG has no alpha; a model has three input channels)."""
    grey = IMAGES[5, :, :, :1]
    alpha = np.full((32, 32, 1), 128, dtype=np.uint8)
    as_rgb = {"grey": np.repeat(grey, 3, axis=-1), "rgba": IMAGES[5]}
    given = {"grey": grey, "rgba": np.concatenate([IMAGES[5], alpha], axis=-1)}
    for kind in ("grey", "rgba"):
        expected = prepare(tf.io.encode_png(as_rgb[kind]).numpy(), storage).numpy()
        np.testing.assert_array_equal(prepare(tf.io.encode_png(given[kind]).numpy(), storage).numpy(), expected)


def test_labels_of_names_a_record_outside_the_split_and_a_missing_index(tmp_path):
    meta = {"image_size": 32, "encoding": "raw", "jpeg_quality": 95, "classes": {"target": ["a"]},
            "splits": {"target/train": {"count": COUNT - 1, "shards": [
                {"file": f"target/{shard_name('train', n, 3)}", "count": 1} for n in range(3)]}}}
    split = write_split(tmp_path / "short", meta=meta)  # 40 records, meta.json says 39
    with pytest.raises(PipelineError) as error:
        records.labels_of(split)
    assert str(error.value) == (f"TFRecord shard {split.files[2]} holds a record of index {COUNT - 1}, outside "
                                f"0..{COUNT - 2} (meta.json says {COUNT - 1} records); delete data/tfrecords and "
                                "rerun `dvc repro`")
    meta["splits"]["target/train"]["count"] = COUNT + 2
    (split.root / records.META_FILE).write_text(json.dumps(meta))
    split = records.open_split(split.root, "target", "train")
    with pytest.raises(PipelineError) as error:
        records.labels_of(split)
    assert str(error.value) == (f"{split.root}/target/train: no record has index {COUNT} of 0..{COUNT + 1}; "
                                "delete data/tfrecords and rerun `dvc repro`")
    with pytest.raises(PipelineError) as error:
        records.check_shards(split)
    assert str(error.value) == f"{split.root}/target: {COUNT} records, meta.json says {COUNT + 2}"


def last_record_start(shard: bytes) -> int:
    """Where a TFRecord file's last record starts: each is its length (8 bytes), their CRC (4), data, its CRC (4)."""
    start = 0
    while (end := start + 16 + int.from_bytes(shard[start:start + 8], "little")) < len(shard):
        start = end
    return start


def test_check_shards_names_a_missing_or_truncated_shard(tmp_path):
    split = write_split(tmp_path / "damaged")
    whole = split.files[1].read_bytes()
    split.files[1].write_bytes(whole[:-100])
    with pytest.raises(PipelineError) as error:
        records.check_shards(split)
    # TensorFlow's reason, without its op and function names ("{{function_node __wrapped__ReduceDataset...}}")
    assert str(error.value) == (f"TFRecord shard {split.files[1]} is truncated or corrupt (truncated record at "
                                f"{last_record_start(whole)}' failed with Read less bytes than requested); delete "
                                "data/tfrecords and rerun `dvc repro`")
    split.files[1].write_bytes(bytes(16) + whole[16:])
    with pytest.raises(PipelineError) as error:
        records.check_shards(split)
    assert str(error.value) == (f"TFRecord shard {split.files[1]} is truncated or corrupt (corrupted record at 0 (Is "
                                "this even a TFRecord file?)); delete data/tfrecords and rerun `dvc repro`")
    split.files[2].unlink()
    split = records.Split(split.root, "target", "train", split.files[2:], COUNT, 32, "raw", ("a",), 95)
    with pytest.raises(PipelineError) as error:
        records.check_shards(split)
    assert str(error.value) == f"TFRecord shard {split.files[0]} is missing; rerun the preprocess stage"


@pytest.mark.parametrize(("meta", "why"), [
    (None, "not found: run the preprocess stage (dvc repro)"),
    ("{", "is damaged; delete {root} and rerun `dvc repro` (not JSON: "),
    (b"\xff", "is damaged; delete {root} and rerun `dvc repro` (not JSON: "),
    ('{"image_size": 0}', "is damaged; delete {root} and rerun `dvc repro` (image_size"),
    ('{"image_size": 32, "encoding": "raw", "jpeg_quality": 95, "classes": {"target": []}, "splits": {}}',
     "is damaged; delete {root} and rerun `dvc repro` (it lacks target/train)"),
    ('{"image_size": 32, "encoding": "raw", "jpeg_quality": 95, "classes": {}, "splits": '
     '{"target/train": {"count": 0, "shards": [{"file": "x", "count": 0}]}}}',
     "is damaged; delete {root} and rerun `dvc repro` (it lacks target/train)"),
])
def test_a_missing_or_damaged_meta_json_is_one_line_naming_it(tmp_path, meta, why):
    if isinstance(meta, bytes):
        (tmp_path / records.META_FILE).write_bytes(meta)
    elif meta is not None:
        (tmp_path / records.META_FILE).write_text(meta)
    with pytest.raises(PipelineError) as error:
        records.open_split(tmp_path, "target", "train")
    assert str(error.value).startswith(f"{tmp_path / records.META_FILE} {why.format(root=tmp_path)}")
    assert "\n" not in str(error.value)


SPLIT_COUNTS = {"source": {"train": 40, "val": 16, "test": 33}, "target": {"train": 17, "val": 16, "test": 40}}


def split_folder(root: Path) -> Path:
    """The split stage's output for SPLIT_COUNTS: each split's images (label = index) and classes.json."""
    for task, counts in SPLIT_COUNTS.items():
        (root / task).mkdir(parents=True)
        for split, count in counts.items():
            np.save(root / task / f"{split}_images.npy", IMAGES[:count])
            np.save(root / task / f"{split}_labels.npy", np.arange(count))
    (root / "classes.json").write_text(json.dumps({"source": ["a", "b"], "target": ["c", "d"]}))
    return root


def test_the_plan_covers_every_split_in_shards_and_meta_json_describes_them(tmp_path):
    split_root, out = split_folder(tmp_path / "split"), tmp_path / "records"
    # 0.03 MB of raw 32 px images (of JPEG ones it would be 1 shard): 2 shards of 40 or 33 images, 1 of 16 or 17
    # (16 images a shard at least).
    jobs, meta = plan_shards(split_root, out, 32, "raw", 80, 0.03)
    assert (meta.image_size, meta.encoding, meta.jpeg_quality) == (32, "raw", 80)
    assert meta.classes == {"source": ["a", "b"], "target": ["c", "d"]}
    assert list(meta.splits) == [f"{task}/{split}" for task in SPLIT_COUNTS for split in SPLIT_COUNTS[task]]
    for task, counts in SPLIT_COUNTS.items():
        for split, count in counts.items():
            ours = [job for job in jobs if job.images == split_root / task / f"{split}_images.npy"]
            shards = len(ours)
            assert shards == (2 if count >= 32 else 1), (task, split)
            assert [(job.start, job.stop) for job in ours] == [
                (count * shard // shards, count * (shard + 1) // shards) for shard in range(shards)]
            for shard, job in enumerate(ours):
                assert job.labels == split_root / task / f"{split}_labels.npy"
                assert job.destination == out / task / shard_name(split, shard, shards)
                assert (job.image_size, job.encoding, job.jpeg_quality) == (32, "raw", 80)
            entry = meta.splits[f"{task}/{split}"]
            assert entry.count == count
            assert [(shard.file, shard.count) for shard in entry.shards] == [
                (f"{task}/{shard_name(split, index, shards)}", job.stop - job.start) for index, job in enumerate(ours)]
    text = meta.text()
    assert text.startswith('{\n  "image_size": 32,\n  "encoding": "raw",\n  "jpeg_quality": 80,\n  "classes"')
    assert text.endswith("}\n") and records.RecordsMeta.model_validate(json.loads(text)) == meta


def test_the_plan_names_a_missing_split(tmp_path):
    split_root = split_folder(tmp_path / "split")
    (split_root / "target" / "val_images.npy").unlink()
    with pytest.raises(PipelineError) as error:
        plan_shards(split_root, tmp_path / "records", 32, "raw", 95, 100)
    assert str(error.value) == f"{split_root / 'target/val_images.npy'} not found: run the split stage (dvc repro)"


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_write_the_shards_one_process_writes(tmp_path, workers):
    """write_all's two worker processes (each a one-thread TensorFlow), or write_all alone in this process, write
    the bytes write_shard writes here."""
    here, there = write_split(tmp_path / "here", size=40, encoding="jpeg"), tmp_path / "there"
    jobs = [ShardJob(here.root / "_images.npy", here.root / "_labels.npy", start, stop,
                     there / "target" / file.name, 40, "jpeg", 95)
            for (start, stop), file in zip(zip(SHARDS, SHARDS[1:]), here.files, strict=True)]
    (there / "target").mkdir(parents=True)
    write_all(jobs, workers)
    assert [file.read_bytes() for file in sorted((there / "target").iterdir())] == [
        file.read_bytes() for file in here.files]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_shard_stops_every_worker_and_is_raised(tmp_path, workers):
    here = write_split(tmp_path / "here")
    jobs = [ShardJob(here.root / "_images.npy", here.root / "_labels.npy", 0, COUNT,
                     tmp_path / "missing" / "folder" / "shard.tfrecord", 32, "raw", 95)]
    before = set(multiprocessing.active_children())  # none, unless another test of this process left one
    with pytest.raises(Exception, match="missing/folder/shard.tfrecord"):
        write_all(jobs, workers)
    assert set(multiprocessing.active_children()) == before


MALFORMED = {
    "a list": lambda meta: "[]",
    "truncated": lambda meta: json.dumps(meta)[:40],
    "splits a list": lambda meta: json.dumps({**meta, "splits": list(meta["splits"])}),
    "size a string": lambda meta: json.dumps({**meta, "image_size": str(meta["image_size"])}),
    "shard a number": lambda meta: json.dumps({**meta, "splits": {"target/train": {"count": 40, "shards": [7]}}}),
    "no splits": lambda meta: json.dumps({**meta, "splits": {}}),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_a_malformed_meta_json_is_one_line_naming_it(raw, tmp_path, damage):
    """A meta.json that parses but does not describe records is as damaged as one that does not parse."""
    meta = tmp_path / records.META_FILE
    meta.write_text(MALFORMED[damage](json.loads((raw.root / records.META_FILE).read_text())))
    with pytest.raises(PipelineError) as error:
        records.open_split(tmp_path, "target", "train")
    assert str(error.value).startswith(f"{meta} is damaged; delete {tmp_path} and rerun `dvc repro` (")
    assert "\n" not in str(error.value)


def test_a_full_disk_while_writing_a_shard_is_the_os_error_it_is(tmp_path):
    """TensorFlow says "<file>; File too large": write_shard raises the OSError it is (outputs names it)."""
    import errno
    import resource

    np.save(tmp_path / "images.npy", IMAGES)
    np.save(tmp_path / "labels.npy", np.arange(COUNT))
    job = ShardJob(tmp_path / "images.npy", tmp_path / "labels.npy", 0, COUNT, tmp_path / "shard", 32,
                           "raw", 95)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # a real refusal by the kernel: EFBIG
    try:
        with pytest.raises(OSError) as error:
            write_shard(job)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (error.value.errno, error.value.strerror, error.value.filename) == (
        errno.EFBIG, "File too large", str(tmp_path / "shard"))
    assert error.value.__suppress_context__


def test_cpu_count_is_what_this_process_may_use():
    """The cores this process may run on (a container's or taskset's limit), not the machine's."""
    import os

    allowed = os.sched_getaffinity(0)
    assert cpu_count() == len(allowed) >= 1
    os.sched_setaffinity(0, {min(allowed)})
    try:
        assert cpu_count() == 1
    finally:
        os.sched_setaffinity(0, allowed)
