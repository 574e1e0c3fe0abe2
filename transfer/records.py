"""TFRecord shards of one task split: writing them and reading them with tf.data.

Each record holds the encoded image, its label and its index in the split;
`meta.json` beside the shards says the image size and encoding, so readers
never guess. TensorFlow is imported inside the functions because the
preprocess stage hands shards to worker processes that must import it fresh.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transfer.config import describe
from transfer.errors import PipelineError
from transfer.outputs import NO_ROOM

if TYPE_CHECKING:  # imported lazily at run time: preprocess workers import this module fresh
    import tensorflow as tf

META_FILE = "meta.json"
JPEG_BYTES_PER_PIXEL = 0.19  # measured: q95 JPEG of upscaled CIFAR-10 is ~17 KB at 299x299
# A tiny shard_size_mb would otherwise ask for more shards than images (empty shards), and every
# shard costs a file, a worker task and a read buffer whatever it holds.
MIN_IMAGES_PER_SHARD = 16


@dataclass(frozen=True)
class ShardJob:
    images: Path  # a split's _images.npy
    labels: Path
    start: int
    stop: int
    destination: Path
    image_size: int
    encoding: str
    jpeg_quality: int


def shard_count(images: int, image_size: int, encoding: str, shard_size_mb: float) -> int:
    """Shards of about shard_size_mb each, but none with fewer than MIN_IMAGES_PER_SHARD images."""
    pixels = image_size * image_size
    bytes_per_image = pixels * 3 if encoding == "raw" else pixels * JPEG_BYTES_PER_PIXEL
    by_size = math.ceil(images * bytes_per_image / (shard_size_mb * 1e6))
    return max(1, min(by_size, images // MIN_IMAGES_PER_SHARD))


def shard_name(split: str, shard: int, shards: int) -> str:
    return f"{split}-{shard:05d}-of-{shards:05d}.tfrecord"


def write_shard(job: ShardJob) -> int:
    """Resize and encode images[start:stop] into one TFRecord file; returns the record count."""
    import tensorflow as tf

    images = np.load(job.images, mmap_mode="r")
    labels = np.load(job.labels)
    try:
        with tf.io.TFRecordWriter(str(job.destination)) as writer:
            for begin in range(job.start, job.stop, 256):
                end = min(begin + 256, job.stop)
                batch = resize(np.asarray(images[begin:end]), job.image_size)
                for offset, image in enumerate(batch):
                    index = begin + offset
                    writer.write(_example(encode(image, job.encoding, job.jpeg_quality), labels[index], index))
    except tf.errors.OpError as error:
        # TensorFlow reports a full disk as "<file>; No space left on device": made the OSError it is, so that
        # outputs.atomic_output says it in one line, whichever worker process met it.
        for number in NO_ROOM:
            if error.message.endswith(os.strerror(number)):
                raise OSError(number, os.strerror(number), str(job.destination)) from None
        raise
    return job.stop - job.start


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, h, w, 3) -> uint8 (N, size, size, 3), bilinear."""
    if images.shape[1:3] == (size, size):
        return images
    return resize_tensor(images, size).numpy()


def resize_tensor(images: tf.Tensor, size: int) -> tf.Tensor:
    """resize in TensorFlow ops, so that a serving graph resizes exactly as the preprocess stage did."""
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


@dataclass(frozen=True)
class Storage:
    """How the preprocess stage stored images, so what a model trained on them saw: resized to image_size, then
    kept raw or as JPEG at jpeg_quality. Models carry it (transfer/models.py) so that new images get the same."""

    image_size: int
    encoding: str
    jpeg_quality: int


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


def _example(image: bytes, label: int, index: int) -> bytes:
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)])),
    }
    # Protobuf writes map entries in a per-process hash order unless asked; identical records need sorted keys.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Split:
    """One split's shards as meta.json describes them."""

    root: Path
    task: str
    name: str
    files: tuple[Path, ...]
    count: int
    image_size: int
    encoding: str
    classes: tuple[str, ...]
    jpeg_quality: int

    @property
    def storage(self) -> Storage:
        return Storage(self.image_size, self.encoding, self.jpeg_quality)


# pydantic names these classes in its messages ("a valid dictionary or instance of ShardMeta").
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)


class ShardMeta(_Strict):
    file: str
    count: int = Field(ge=0)


class SplitMeta(_Strict):
    count: int = Field(ge=0)
    shards: list[ShardMeta] = Field(min_length=1)


class RecordsMeta(_Strict):
    """What readers take from meta.json; other keys are ignored, so the preprocess stage may add some."""

    image_size: int = Field(ge=1)
    encoding: Literal["jpeg", "raw"]
    jpeg_quality: int = Field(ge=1, le=100)
    classes: dict[str, list[str]]
    splits: dict[str, SplitMeta]


def open_split(root: Path, task: str, split: str) -> Split:
    """The split as `root`/meta.json describes it; a missing or malformed meta.json is a PipelineError."""
    meta_path = root / META_FILE
    damaged = f"{meta_path} is damaged; delete {root} and rerun `dvc repro`"
    try:
        meta = RecordsMeta.model_validate(json.loads(meta_path.read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{meta_path} not found: run the preprocess stage (dvc repro)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{damaged} (not JSON: {error})") from None
    except ValidationError as error:
        raise PipelineError(f"{damaged} ({describe(error)})") from None
    entry = meta.splits.get(f"{task}/{split}")
    if entry is None or task not in meta.classes:
        raise PipelineError(f"{damaged} (it lacks {task}/{split})")
    files = tuple(root / shard.file for shard in entry.shards)
    return Split(root, task, split, files, entry.count, meta.image_size, meta.encoding, tuple(meta.classes[task]),
                 meta.jpeg_quality)


def check_shards(split: Split) -> None:
    """Read every shard once: a missing, truncated or corrupt shard is an error naming it."""
    import tensorflow as tf

    total = 0
    for path in split.files:
        if not path.is_file():
            raise PipelineError(f"TFRecord shard {path} is missing; rerun the preprocess stage")
        try:
            total += sum(1 for _ in tf.data.TFRecordDataset(str(path), buffer_size=1 << 22))
        except (tf.errors.DataLossError, tf.errors.OpError) as error:
            reason = error.message.splitlines()[0]
            raise PipelineError(
                f"TFRecord shard {path} is truncated or corrupt ({reason}); "
                "delete data/tfrecords and rerun `dvc repro`"
            ) from None
    if total != split.count:
        raise PipelineError(f"{split.root}/{split.task}: {total} records, meta.json says {split.count}")


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a resumed run shuffles epoch e exactly as an uninterrupted one does."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epochs(
    split: Split,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    keep: np.ndarray | None = None,
) -> Callable[[int], tf.data.Dataset]:
    """epoch -> that epoch's tf.data pipeline of (float32 image batch, int64 labels), read from the shards.

    Order is a function of (seed, epoch) alone: shards are interleaved with a fixed cycle,
    and the small encoded records are shuffled before decoding with epoch_seed(seed, epoch).
    `keep` is a boolean mask over the split's indices (a labelled subset).
    """
    import tensorflow as tf

    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "index": tf.io.FixedLenFeature([], tf.int64),
    }
    size, encoding = split.image_size, split.encoding

    def decode_record(record):
        return tf.cast(decode(record["image"], encoding, size), tf.float32), record["label"]

    records = tf.data.Dataset.from_tensor_slices([str(path) for path in split.files]).interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=1 << 22),
        cycle_length=min(4, len(split.files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    records = records.map(lambda record: tf.io.parse_single_example(record, features),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if keep is not None:
        mask = tf.constant(keep, dtype=tf.bool)
        # A labelled subset is small: keep its encoded records in memory rather than rescan every shard each
        # epoch. The cache belongs to this dataset object, so every epoch below shares it.
        records = records.filter(lambda record: tf.gather(mask, record["index"])).cache()
    # Filtering and interleaving hide the length; Keras needs it to end epochs cleanly.
    batches = math.ceil((split.count if keep is None else int(keep.sum())) / batch_size)

    def epoch_data(epoch: int) -> tf.data.Dataset:
        data = records
        if shuffle_buffer:
            data = data.shuffle(shuffle_buffer, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
        data = data.map(decode_record, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        return data.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(tf.data.AUTOTUNE)

    return epoch_data


def dataset(
    split: Split,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    keep: np.ndarray | None = None,
) -> tf.data.Dataset:
    """One pass over the split (in epoch 0's order when shuffled); see `epochs`."""
    return epochs(split, batch_size, shuffle_buffer=shuffle_buffer, seed=seed, keep=keep)(0)


def labels_of(split: Split) -> np.ndarray:
    """Labels indexed by the records' split index, read without decoding images."""
    import tensorflow as tf

    labels = np.full(split.count, -1, dtype=np.int64)
    seen = np.zeros(split.count, dtype=bool)
    spec = {"label": tf.io.FixedLenFeature([], tf.int64), "index": tf.io.FixedLenFeature([], tf.int64)}
    rerun = "delete data/tfrecords and rerun `dvc repro`"
    for path in split.files:  # one at a time, to name the shard a bad record is in
        parsed = tf.data.TFRecordDataset(str(path)).map(lambda record: tf.io.parse_single_example(record, spec))
        for batch in parsed.batch(4096).as_numpy_iterator():
            index = batch["index"]
            outside = index[(index < 0) | (index >= split.count)]  # a negative one would silently count from the end
            if outside.size:
                raise PipelineError(f"TFRecord shard {path} holds a record of index {outside[0]}, outside "
                                    f"0..{split.count - 1} (meta.json says {split.count} records); {rerun}")
            labels[index], seen[index] = batch["label"], True
    if not seen.all():
        raise PipelineError(f"{split.root}/{split.task}/{split.name}: no record has index {int(np.argmin(seen))} "
                            f"of 0..{split.count - 1}; {rerun}")
    return labels


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
