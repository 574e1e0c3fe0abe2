"""Reading TFRecord shards with TensorFlow's default read buffer against an explicit 4 MiB one.

records.check_shards reads every shard of a split once before a training stage starts. This writes the first
`--images` training images of the archive at 299 px as JPEG shards (transfer/sharding.py, as the preprocess stage
does), then counts their records as check_shards does, alternating the two buffers, and reports the median of each
and their ratio. The files stay in the page cache between repeats: this measures the reader, not the disk.

    python -m benchmarks.read_buffer [--images 3000] [--repeats 7] [--workdir /tmp/benchmarks]
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.common import arguments, report
from transfer.cifar10 import read_archive
from transfer.sharding import ShardJob, write_shard

SHARDS = 4
BUFFERS = {"default": None, "4_mib": 1 << 22}


def write_shards(archive: Path, images: int, folder: Path) -> list[Path]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cifar = read_archive(archive)
    np.save(folder / "images.npy", cifar.train_images[:images])
    np.save(folder / "labels.npy", cifar.train_labels[:images])
    files = []
    for shard in range(SHARDS):
        files.append(folder / f"train-{shard}.tfrecord")
        write_shard(ShardJob(folder / "images.npy", folder / "labels.npy", images * shard // SHARDS,
                             images * (shard + 1) // SHARDS, files[-1], 299, "jpeg", 95))
    return files


def counted(files: list[Path], buffer: int | None) -> int:
    total = 0
    for path in files:
        records = tf.data.TFRecordDataset(str(path), buffer_size=buffer)
        total += int(records.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    return total


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    files = write_shards(args.archive, args.images, args.workdir / "read_buffer")
    seconds: dict[str, list[float]] = {name: [] for name in BUFFERS}
    for buffer in BUFFERS.values():
        assert counted(files, buffer) == args.images  # a first read of each, outside the clock
    for repeat in range(args.repeats):
        for name in (BUFFERS if repeat % 2 == 0 else reversed(BUFFERS)):
            started = time.perf_counter()
            counted(files, BUFFERS[name])
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report({"benchmark": "read_buffer", "images": args.images, "repeats": args.repeats,
            "shard_mb": round(sum(path.stat().st_size for path in files) / 1e6, 1),
            "default_seconds": round(medians["default"], 4), "4_mib_seconds": round(medians["4_mib"], 4),
            "ratio_default_to_4_mib": round(medians["default"] / medians["4_mib"], 3)})


if __name__ == "__main__":
    main()
