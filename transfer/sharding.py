"""Sharding the split into TFRecords: planning the shards and writing them in parallel worker processes.

The shards are written by a pool of worker processes, each with a one-thread
TensorFlow, so N workers use N cores. The output does not depend on the
number of workers. Workers die with the stage, even a kill -9 of it, so none
goes on writing into a folder that the next run deletes. The record format and
the writing of one shard live in transfer/records.py.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transfer.errors import PipelineError
from transfer.paths import SPLITS, TASKS
from transfer.records import ShardJob, shard_count, shard_name, write_shard


def plan_shards(split_root: Path, out_root: Path, image_size: int, encoding: str, jpeg_quality: int,
                shard_size_mb: float) -> tuple[list[ShardJob], dict]:
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
    meta = {"image_size": image_size, "encoding": encoding, "jpeg_quality": jpeg_quality,
            "classes": classes, "splits": splits}
    return jobs, meta


def _start_worker(stage: int) -> None:
    """Set up a worker process: it dies with the stage, ignores Ctrl-C and runs a one-thread TensorFlow."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the stage
    if os.getppid() != stage:  # the stage died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the stage handles it
    _single_threaded_tensorflow()


def _single_threaded_tensorflow() -> None:
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def write_all(jobs: list[ShardJob], workers: int) -> None:
    """Write every shard with `workers` worker processes, biggest first, showing progress in images."""
    biggest_first = sorted(jobs, key=lambda job: job.start - job.stop)
    # spawn, not fork: a forked copy of a process that already runs TensorFlow can deadlock.
    context = multiprocessing.get_context("spawn")
    total = sum(job.stop - job.start for job in jobs)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        with tqdm(total=total, unit="img", desc="preprocess", mininterval=1) as bar:
            for done in as_completed([pool.submit(write_shard, job) for job in biggest_first]):
                bar.update(done.result())
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
