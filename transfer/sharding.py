"""Sharding the split into TFRecords: planning the shards and writing them in parallel worker processes.

The shards are written by a pool of worker processes, each with a one-thread
TensorFlow, so N workers use N cores; one worker writes in the stage's own
process. The output does not depend on the number of workers. Workers die
with the stage, even a kill -9 of it, so none goes on writing into a folder
that the next run deletes. How an image is stored is transfer/images.py's;
meta.json's schema and the readers are transfer/records.py's.
"""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transfer.errors import PipelineError
from transfer.images import encode, resize
from transfer.outputs import NO_ROOM
from transfer.paths import SPLITS, TASKS
from transfer.records import RecordsMeta

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


def _example(image: bytes, label: int, index: int) -> bytes:
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)])),
    }
    # Protobuf writes map entries in a per-process hash order unless asked; identical records need sorted keys.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def plan_shards(split_root: Path, out_root: Path, image_size: int, encoding: str, jpeg_quality: int,
                shard_size_mb: float) -> tuple[list[ShardJob], RecordsMeta]:
    """The shard jobs for every split, and the meta.json that describes their result."""
    jobs, splits = [], {}
    for task in TASKS:
        for split in SPLITS:
            images_path = split_root / task / f"{split}_images.npy"
            if not images_path.is_file():
                raise PipelineError(f"{images_path} not found: run the split stage (dvc repro)")
            count = len(np.load(images_path, mmap_mode="r"))
            shards = shard_count(count, image_size, encoding, shard_size_mb)
            bounds = np.linspace(0, count, shards + 1).astype(int)
            entries = []
            for shard in range(shards):
                name = f"{task}/{shard_name(split, shard, shards)}"
                start, stop = int(bounds[shard]), int(bounds[shard + 1])
                jobs.append(ShardJob(images_path, split_root / task / f"{split}_labels.npy", start, stop,
                                     out_root / name, image_size, encoding, jpeg_quality))
                entries.append({"file": name, "count": stop - start})
            splits[f"{task}/{split}"] = {"count": count, "shards": entries}
    classes = json.loads((split_root / "classes.json").read_text())
    meta = RecordsMeta.model_validate({"image_size": image_size, "encoding": encoding, "jpeg_quality": jpeg_quality,
                                       "classes": classes, "splits": splits})
    return jobs, meta


def _start_worker(stage: int) -> None:
    """Set up a worker process: it dies with the stage, ignores Ctrl-C and runs a one-thread TensorFlow."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the stage
    if os.getppid() != stage:  # the stage died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the stage handles it
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    _single_threaded_tensorflow()


def _single_threaded_tensorflow() -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already runs in this process (a test's): its threads stay as they are
        pass


def _show_progress(counts: Iterable[int], total: int) -> None:
    """Consume the shards' record counts as they finish, counting images on a progress bar."""
    with tqdm(total=total, unit="img", desc="preprocess", mininterval=1) as bar:
        for count in counts:
            bar.update(count)


def write_all(jobs: list[ShardJob], workers: int) -> None:
    """Write every shard with `workers` worker processes, biggest first, showing progress in images.

    One worker writes in this process, with one thread as a worker process would: such a process would cost a
    TensorFlow import (4 CPU-s) and parallelise nothing."""
    biggest_first = sorted(jobs, key=lambda job: job.start - job.stop)
    total = sum(job.stop - job.start for job in jobs)
    if workers == 1:
        _single_threaded_tensorflow()
        _show_progress(map(write_shard, biggest_first), total)
        return
    # spawn, not fork: a forked copy of a process that already runs TensorFlow can deadlock.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        finished = as_completed([pool.submit(write_shard, job) for job in biggest_first])
        _show_progress((done.result() for done in finished), total)
    except BaseException:
        # A failed shard or Ctrl-C: stop the other workers before atomic_output deletes the folder
        # they write into. shutdown() would wait for their shards and Python < 3.14 has no public way
        # to kill an executor's workers, but they are this stage's only multiprocessing children.
        # (multiprocessing.Pool.terminate() would do, but a Pool whose worker is killed, by the OOM
        # killer say, waits for that worker's result for ever.)
        processes = multiprocessing.active_children()
        for process in processes:
            process.kill()
        for process in processes:
            process.join()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
