"""Preprocess throughput: TFRecord images/s with one worker process against all cores.

    python -m benchmarks.preprocess [--per-class N] [--image-size 299]

records_mib: the size of the TFRecord shards a run writes (all --per-class images of both tasks).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import arguments, report, run_stages, workspace
from transfer.config import load_params
from transfer.paths import SPLIT
from transfer.sharding import cpu_count, plan_shards, write_all


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--per-class", type=int, default=None, help="cap per class and split (default: all)")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--encoding", default="jpeg", choices=["jpeg", "raw"])
    args = parser.parse_args()
    workspace("preprocess", args, {"data.max_per_class": args.per_class, "preprocess.image_size": args.image_size,
                                   "preprocess.encoding": args.encoding,
                                   "model.backbone": "small_cnn", "model.weights": "none"})  # any size allowed
    run_stages("download", "split")
    settings = load_params().preprocess
    rates = {}
    for workers in (1, cpu_count()):
        with tempfile.TemporaryDirectory(dir=".") as folder:
            jobs, meta = plan_shards(SPLIT, Path(folder), settings.image_size, settings.encoding,
                                     settings.jpeg_quality, settings.shard_size_mb)
            for task in ("source", "target"):
                (Path(folder) / task).mkdir()
            images = sum(job.stop - job.start for job in jobs)
            started = time.perf_counter()
            write_all(jobs, workers)
            rates[workers] = images / (time.perf_counter() - started)
            mib = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()) / 2**20
    one, every = rates[1], rates[cpu_count()]
    report({"benchmark": "preprocess", "images": images, "shards": len(jobs), "image_size": settings.image_size,
            "encoding": settings.encoding, "records_mib": round(mib, 1), "workers": cpu_count(),
            "images_per_second_1_worker": round(one, 1),
            "images_per_second_all_workers": round(every, 1), "speedup": round(every / one, 2)})


if __name__ == "__main__":
    main()
