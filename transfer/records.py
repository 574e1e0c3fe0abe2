"""The TFRecord shards of one task split, read with tf.data, and meta.json, the schema their writer shares.

Each record holds the encoded image (transfer/images.py), its label and its index in the split;
`meta.json` beside the shards says the image size and encoding, so readers never guess. The
preprocess stage writes both (transfer/sharding.py) through `RecordsMeta`, the one schema of meta.json.
TensorFlow is imported inside the functions because preprocess worker processes import this module fresh.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transfer.config import describe
from transfer.errors import PipelineError, tensorflow_reason
from transfer.images import Storage, decode

if TYPE_CHECKING:  # imported lazily at run time: preprocess workers import this module fresh
    import tensorflow as tf

META_FILE = "meta.json"


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
    """meta.json: the preprocess stage writes it (`text`) and every reader validates it. A reader ignores
    other keys, so an older reader still reads a meta.json that a later writer extended."""

    image_size: int = Field(ge=1)
    encoding: Literal["jpeg", "raw"]
    jpeg_quality: int = Field(ge=1, le=100)
    classes: dict[str, list[str]]
    splits: dict[str, SplitMeta]

    def text(self) -> str:
        """The file's contents: keys in the order above, indented, so equal shards give an identical file."""
        return json.dumps(self.model_dump(), indent=2) + "\n"


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
            # Counted in TensorFlow: a Python loop over the records cost seconds per training stage. TensorFlow's
            # default read buffer: 8 to 12 % faster here than 4 MiB (python -m benchmarks.read_buffer).
            total += int(tf.data.TFRecordDataset(str(path)).reduce(tf.constant(0, tf.int64),
                                                                   lambda count, _: count + 1))
        except (tf.errors.DataLossError, tf.errors.OpError) as error:
            raise PipelineError(
                f"TFRecord shard {path} is truncated or corrupt ({tensorflow_reason(error.message)}); "
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
        tf.data.TFRecordDataset,
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
