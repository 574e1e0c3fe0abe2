"""Peak resident memory growth of the feature cache's pass over the first N target images, in a fresh process.

    python -m benchmarks.cache_rss --workspace /tmp/benchmarks/finetune_cache --images 150

Run in the workspace benchmarks.finetune_cache left (its records, params and pretrained model), it builds the
classifier and its frozen prefix as the finetune stage does and caches the first --images images of the target
task (train, then val, then test) with transfer/feature_cache.py into a scratch folder, deleted afterwards.
A process of its own, so that memory an earlier pass left to TensorFlow's allocator cannot hide the growth;
benchmarks.finetune_cache runs it at two image counts to split the growth into a fixed part and a slope.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import report
from benchmarks.memory import peak_rss_growth
from transfer import feature_cache
from transfer.config import load_params
from transfer.feature_cache import inference_batch
from transfer.models import frozen_prefix
from transfer.records import dataset
from transfer.runtime import set_up
from transfer.training import build_classifier, open_task
from transfer.training_stage import run_for

SCRATCH = Path("checkpoints/cache_rss/features")


def growth_mib(images: int) -> dict:
    """Cache the first `images` target images in this process: what feature_cache reports about it."""
    splits = open_task("target")
    params = load_params()
    set_up(params.training, params.finetune.seed)
    run = dataclasses.replace(run_for("finetune", params), cache_features=True, checkpoints=False)
    size = splits["train"].image_size
    prefix = frozen_prefix(build_classifier(run, params, len(splits["train"].classes), size))[0]
    batch, counts, datasets, left = inference_batch(size), {}, {}, images
    for name, split in splits.items():
        counts[name] = min(left, split.count)
        datasets[name] = dataset(split, batch).unbatch().take(counts[name]).batch(batch)
        left -= counts[name]
    if left:
        raise SystemExit(f"cache_rss: --images {images} is more than the target task's {images - left} images")
    try:
        cache, growth = peak_rss_growth(lambda: feature_cache.build(prefix, datasets, counts, SCRATCH))
        return {**cache.describe(), "peak_rss_growth_mib": None if growth is None else round(growth / 2**20, 1)}
    finally:
        shutil.rmtree(SCRATCH.parent, ignore_errors=True)


def in_fresh_process(workspace: Path, images: int) -> dict:
    """growth_mib(images) run by `python -m benchmarks.cache_rss` in `workspace`: its RESULT."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.cache_rss", "--workspace", str(workspace),
                             "--images", str(images)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"benchmark: cache_rss --images {images} failed:\n{result.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, required=True, help="a workspace benchmarks.finetune_cache left")
    parser.add_argument("--images", type=int, required=True, help="target images to cache")
    args = parser.parse_args()
    os.chdir(args.workspace)
    described = growth_mib(args.images)
    report({"benchmark": "cache_rss", "images": described["images"],
            "peak_rss_growth_mib": described["peak_rss_growth_mib"], "seconds": described["seconds"]})


if __name__ == "__main__":
    main()
