"""Stage 3: write every split as sharded TFRecords at preprocess.image_size (transfer/sharding.py).

preprocess.workers worker processes (all cores by default) write the shards;
the output does not depend on their number.
"""

from __future__ import annotations

from transfer.config import load_params
from transfer.errors import run_stage
from transfer.outputs import atomic_output
from transfer.paths import RECORDS, SPLIT, TASKS
from transfer.records import META_FILE
from transfer.sharding import cpu_count, plan_shards, write_all


def main() -> None:
    params = load_params()
    settings = params.preprocess
    workers = settings.workers or cpu_count()
    with atomic_output(RECORDS) as folder:
        jobs, meta = plan_shards(SPLIT, folder, settings.image_size, settings.encoding,
                                 settings.jpeg_quality, settings.shard_size_mb)
        for task in TASKS:
            (folder / task).mkdir(parents=True)
        write_all(jobs, workers)
        (folder / META_FILE).write_text(meta.text())
    print(f"preprocess: {len(jobs)} shards at {settings.image_size}px ({settings.encoding}) "
          f"with {workers} workers in {RECORDS}")


if __name__ == "__main__":
    run_stage(main)
