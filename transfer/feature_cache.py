"""The frozen prefix's output, computed once and streamed from disk while the trainable rest trains.

Why: the keras.io transfer-learning guide (https://keras.io/guides/transfer_learning/, "The typical
transfer-learning workflow") notes that recording the frozen base's output once means "you only run the base
model once on your data, rather than once per epoch of training", which is "a lot faster & cheaper". Here the
trainable rest is the same model as training through the whole network (transfer/models.py's frozen_prefix).

At 299 px the prefix's output is large (strategy 2 of InceptionV3: six 8x8 maps, 2,048 channels,
256 KiB per image in float16; 7.3 GiB for the 30,000 target images), so it lives in files, not
in memory:

- one inference pass per split, in batches sized by image area (the activations of a batch, not
  the number of images, bound the memory), each batch written at once to fixed-length records
  (an int32 label, then every output flattened) in shards of about SHARD_BYTES;
- features are stored in float16: half of float32's bytes, and its 11-bit significand keeps the
  features closer than bfloat16's 8 bits (measured on InceptionV3's strategy-1 and -2 prefixes at 75
  and 299 px: 1.7e-4 mean relative error against 1.4e-3); bfloat16's wider range is not needed: a batch
  that does not fit float16 (too large, or too many features rounding to 0) switches the whole cache to
  float32, and the log says so;
- each training epoch reads the shards in an order drawn from records.epoch_seed(seed, epoch),
  interleaved, through a shuffle buffer of at most SHUFFLE_BYTES, so a rerun or a resumed run sees
  exactly the same batches; val and test are read in order;
- the caller deletes the folder when the stage ends, however it ends (training.train_classifier); what a
  hard-killed run left there is deleted before the free disk is measured, so it cannot push the next run
  onto the slow path. The folder (checkpoints/<stage>/features) is no DVC output and .dvcignore'd;
- a full disk while writing is one line naming the folder, and the folder is deleted.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from transfer.evaluation import batches, inference_step
from transfer.feature_shards import LABEL_DTYPE, OutOfRange, ShardWriter, records
from transfer.models import computing_in, frozen_prefix
from transfer.outputs import NO_ROOM, no_room
from transfer.records import epoch_seed

STORAGE_DTYPE = np.dtype("<f2")  # float16, little-endian as tf.io.decode_raw reads it
FALLBACK_DTYPE = np.dtype("<f4")  # when a feature exceeds float16's range (65,504)
SHARD_BYTES = 32 << 20  # one shard file: small enough that shuffling the shard order mixes the data
SHUFFLE_BYTES = 256 << 20  # at most this many bytes of stored records wait in the training shuffle buffer
DISK_MARGIN = 1 << 30  # left free on the disk after the cache is written
BATCH_PIXELS = 128 * 75 * 75  # images per inference batch x their area: 128 at 75 px, 8 at 299 px
CYCLE = 4  # shards read at once by a training epoch
# How much slower the other path is, as measured (BENCHMARKS.md, InceptionV3, whole fine-tunes): 10.2x at 75 px on all
# of CIFAR-10 (10 epochs), 2.85x at 299 px on a hundredth (5 epochs, the cache pass dominating).
SLOWER = "slower: the frozen layers run every epoch; 2.9x to 10x in BENCHMARKS.md's measurements"


class NoRoom(Exception):
    """The disk cannot hold the cache (with DISK_MARGIN to spare); the message says how much is missing."""


@dataclass(frozen=True)
class FeatureCache:
    """Features of every split on disk, and how to read them back as tf.data datasets."""

    folder: Path
    shapes: tuple[tuple[int, ...], ...]  # one per prefix output, without the batch axis
    dtype: np.dtype
    shards: dict[str, tuple[Path, ...]]
    counts: dict[str, int]
    seconds: float  # the inference pass and the writing
    computed_in: str  # the dtype the prefix computed in

    @property
    def record_bytes(self) -> int:
        return LABEL_DTYPE.itemsize + self.dtype.itemsize * sum(math.prod(shape) for shape in self.shapes)

    @property
    def bytes(self) -> int:
        return self.record_bytes * sum(self.counts.values())

    def dataset(self, split: str, batch_size: int) -> tf.data.Dataset:
        """Every record of `split` once, in the order it was written, batched."""
        records = tf.data.FixedLengthRecordDataset([str(path) for path in self.shards[split]], self.record_bytes)
        return self._decoded(records, batch_size, self.counts[split])

    def epochs(self, batch_size: int, shuffle_buffer: int, seed: int) -> Callable[[int], tf.data.Dataset]:
        """epoch -> that epoch's shuffled training batches; the order depends on (seed, epoch) alone."""
        shards = [str(path) for path in self.shards["train"]]
        buffer = max(1, min(shuffle_buffer, SHUFFLE_BYTES // self.record_bytes))

        def epoch_data(epoch: int) -> tf.data.Dataset:
            order = epoch_seed(seed, epoch)
            files = [shards[i] for i in np.random.default_rng(order).permutation(len(shards))]
            records = tf.data.Dataset.from_tensor_slices(files).interleave(
                lambda path: tf.data.FixedLengthRecordDataset(path, self.record_bytes),
                cycle_length=min(CYCLE, len(files)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            records = records.shuffle(buffer, seed=order, reshuffle_each_iteration=False)
            return self._decoded(records, batch_size, self.counts["train"])

        return epoch_data

    def _decoded(self, records: tf.data.Dataset, batch_size: int, count: int) -> tf.data.Dataset:
        # Decoding a batch of records at once: one op per output instead of one per record.
        offsets = np.cumsum([LABEL_DTYPE.itemsize] + [self.dtype.itemsize * math.prod(s) for s in self.shapes])
        stored = tf.dtypes.as_dtype(self.dtype.newbyteorder("="))

        def decode(batch: tf.Tensor) -> tuple:
            labels = tf.io.decode_raw(tf.strings.substr(batch, 0, LABEL_DTYPE.itemsize), tf.int32)
            outputs = tuple(
                tf.cast(tf.reshape(tf.io.decode_raw(tf.strings.substr(batch, start, end - start), stored),
                                   (-1, *shape)), tf.float32)
                for start, end, shape in zip(offsets[:-1], offsets[1:], self.shapes))
            return outputs[0] if len(outputs) == 1 else outputs, tf.cast(tf.reshape(labels, (-1,)), tf.int64)

        decoded = records.batch(batch_size).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        return decoded.apply(tf.data.experimental.assert_cardinality(math.ceil(count / batch_size))).prefetch(
            tf.data.AUTOTUNE)

    def describe(self) -> dict:
        """How the features were cached, for the stage's metrics JSON."""
        return {"storage": "disk", "dtype": self.dtype.newbyteorder("=").name, "computed_in": self.computed_in,
                "images": sum(self.counts.values()), "mib": round(self.bytes / 2**20, 1),
                "seconds": round(self.seconds, 1), "reason": None}


def plan(model: keras.Model, wanted: bool, images: int, folder: Path,
         stage: str) -> tuple[tuple[keras.Model, keras.Model] | None, dict]:
    """Whether `model` trains on cached features: ((frozen prefix, trainable suffix), None) if so, else (None,
    the not-cached report saying why: not wanted, nothing frozen, or no room for `images` images under `folder`).

    Deletes what a hard-killed run left in `folder` first (no `finally` runs after kill -9), so that it cannot
    push this run onto the slow path.
    """
    shutil.rmtree(folder, ignore_errors=True)
    if not wanted:
        return None, not_cached("cache_features is off")
    cut = frozen_prefix(model)
    if cut is None:
        return None, not_cached("the whole base trains: nothing is frozen to cache")
    if reason := room_for(cut[0], images, folder):
        print(f"{stage}: {reason}; training through the base instead ({SLOWER})")
        return None, not_cached(reason)
    return cut, None


def not_cached(reason: str | None) -> dict:
    """What the metrics JSON says when the stage trained through the base: the same keys as describe()."""
    return {"storage": "none", "dtype": None, "computed_in": None, "images": 0, "mib": 0.0, "seconds": 0.0,
            "reason": reason}


def inference_batch(image_size: int) -> int:
    """Images per inference batch: the same pixels per batch at every size, so memory does not grow with it."""
    return max(1, BATCH_PIXELS // (image_size * image_size))


def storage_bytes(prefix: keras.Model, images: int, dtype: np.dtype = STORAGE_DTYPE) -> int:
    """Disk the cache of `images` images takes in `dtype`."""
    per_image = sum(math.prod(tensor.shape[1:]) for tensor in prefix.outputs)
    return images * (LABEL_DTYPE.itemsize + dtype.itemsize * per_image)


def room_for(prefix: keras.Model, images: int, folder: Path, dtype: np.dtype = STORAGE_DTYPE) -> str | None:
    """None if the disk under `folder` holds the cache in `dtype` with DISK_MARGIN to spare, else why not.
    Measure it with `folder` deleted: a leftover of a killed run is no reason to give up the cache."""
    needed = storage_bytes(prefix, images, dtype)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed + DISK_MARGIN <= free:
        return None
    return (f"the feature cache needs {needed / 2**30:.1f} GiB of {dtype.name} in {folder} and "
            f"{DISK_MARGIN / 2**30:.0f} GiB to spare, but only {free / 2**30:.1f} GiB is free")


def build(prefix: keras.Model, datasets: dict[str, tf.data.Dataset], counts: dict[str, int], folder: Path,
          bfloat16: bool = False) -> FeatureCache:
    """Run `prefix` once over each dataset of (images, labels) and write its output under `folder`.

    bfloat16: compute the pass in bfloat16 (a CPU with AMX runs it faster; see runtime.frozen_pass_bfloat16).
    Raises NoRoom when the disk cannot hold it, before writing anything (float32 needs twice float16's room).
    The caller deletes `folder` when it is done with the cache.
    """
    computed_in = "bfloat16" if bfloat16 else keras.config.dtype_policy().compute_dtype
    prefix = computing_in(prefix, "mixed_bfloat16") if bfloat16 else prefix

    def write_if_room(dtype: np.dtype) -> FeatureCache:
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's leftover, or the float16 attempt
        if reason := room_for(prefix, sum(counts.values()), folder, dtype):
            raise NoRoom(reason)
        return write(prefix, datasets, counts, folder, dtype, computed_in)

    try:
        return write_if_room(STORAGE_DTYPE)
    except OutOfRange as overflow:
        print(f"feature cache: {overflow}; storing float32 instead")
        return write_if_room(FALLBACK_DTYPE)


def write(prefix: keras.Model, datasets: dict[str, tf.data.Dataset], counts: dict[str, int], folder: Path,
          dtype: np.dtype, computed_in: str = "float32") -> FeatureCache:
    """The prefix's output over every dataset, written to shards in `folder` (emptied first)."""
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = tuple(tuple(int(d) for d in tensor.shape[1:]) for tensor in prefix.outputs)
    record_bytes = LABEL_DTYPE.itemsize + dtype.itemsize * sum(math.prod(shape) for shape in shapes)
    per_shard = max(1, SHARD_BYTES // record_bytes)
    step = inference_step(prefix)
    shards = {}
    for split, data in datasets.items():
        writer = ShardWriter(folder, split, per_shard)
        try:
            for images, labels in batches(data, f"caching features of {split}"):
                outputs = [part.numpy() for part in tf.nest.flatten(step(images))]
                writer.add(records(outputs, labels.numpy(), dtype))
            shards[split] = writer.close()
        except OSError as error:
            with contextlib.suppress(OSError):  # closing flushes, and fails again on a full disk
                writer.close()
            shutil.rmtree(folder, ignore_errors=True)
            if error.errno in NO_ROOM:
                raise no_room(folder, error) from None
            raise
        if writer.written != counts[split]:
            raise RuntimeError(f"feature cache: {split} gave {writer.written} records, expected {counts[split]}")
    return FeatureCache(folder, shapes, dtype, shards, dict(counts), time.perf_counter() - started, computed_in)
