"""Fine-tuning with the cached frozen prefix against the plain path: same data, epochs and seed.

    python -m benchmarks.finetune_cache [--fraction 0.2 --image-size 75 --epochs 10 --strategy 1]
    python -m benchmarks.finetune_cache --image-size 299 --strategy 2 --fraction 0.02 --pretrain-epochs 1

What each timing covers (all in this one process, after pretrain ran in its own):
- cached_seconds, plain_seconds: one whole train_classifier call: building the classifier (loading the
  pretrained model), for the cached run the one pass that writes the features to disk, training every
  epoch, and evaluating train, val and test;
- build_seconds: building the classifier and cutting its frozen prefix, timed on its own;
- inference_seconds: one inference pass of the frozen prefix over every target image (train, val, test),
  read from the TFRecords as the cache pass reads them, output discarded (tracing included, as in the
  cache pass). limit_ratio = cached_seconds / inference_seconds; limit_ratio_without_build subtracts
  build_seconds from the cached run.
The cached run goes first, so that rss_growth_per_image_kib (the peak resident memory growth during the cached
run, the cache pass and the epochs on its features, per cached image; Linux only) is not hidden by memory an
earlier run left to TensorFlow's allocator; the inference pass comes right after it, so that both sides of
limit_ratio share the machine's load; then the plain run.

--fraction takes that share of every class of the CIFAR-10 archive, so train,
val and test keep the pipeline's proportions (0.2: 4,500 target training
images, 500 val, 1,000 test; 1: all 30,000).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import tensorflow as tf

from benchmarks.common import arguments, prepared, report
from benchmarks.memory import peak_rss_growth
from transfer.config import load_params
from transfer.feature_cache import inference_batch
from transfer.models import computing_in, frozen_prefix
from transfer.records import dataset
from transfer.runtime import set_up
from transfer.training import build_classifier, open_task, train_classifier
from transfer.training_stage import run_for


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--backbone", default="inception_v3", choices=["small_cnn", "inception_v3"])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of every class of the archive")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--strategy", type=int, default=1)
    parser.add_argument("--frozen-pass", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="dtype of the cache's inference pass (auto: bfloat16 on a CPU with AMX)")
    parser.add_argument("--workspace", type=Path,
                        help="reuse the records and pretrained model of an earlier run's workspace (its params)")
    args = parser.parse_args()
    prepared("finetune_cache", args, {
        "model.backbone": args.backbone, "model.weights": "none", "preprocess.image_size": args.image_size,
        "pretrain.epochs": args.pretrain_epochs, "finetune.epochs": args.epochs, "strategy": args.strategy,
    }, ("download", "split", "preprocess", "pretrain"))

    splits = open_task("target")
    params = load_params()
    results = {}
    for cache in (True, False):
        runtime = set_up(params.training, params.finetune.seed)
        if args.frozen_pass != "auto":
            runtime = dataclasses.replace(runtime, frozen_pass_bfloat16=args.frozen_pass == "bfloat16")
        # No checkpoints: the comparison is of training, not of saving models.
        run = dataclasses.replace(run_for("finetune", params), cache_features=cache, checkpoints=False)
        started = time.perf_counter()
        result, growth = peak_rss_growth(lambda: train_classifier(run, splits, params, runtime))  # noqa: B023
        results[cache] = (time.perf_counter() - started, result)
        if cache:  # right after the cached run, so that both sides of limit_ratio share the machine's load
            assert result.feature_cache["storage"] == "disk", result.feature_cache
            rss_growth = growth
            started = time.perf_counter()
            prefix = frozen_prefix(build_classifier(run, params, len(splits["train"].classes), args.image_size))[0]
            build_seconds = time.perf_counter() - started
            if runtime.frozen_pass_bfloat16:
                prefix = computing_in(prefix, "mixed_bfloat16")
            inference_seconds = one_pass(prefix, splits, inference_batch(args.image_size))
    (cached_seconds, cached), (plain_seconds, plain) = results[True], results[False]

    cached_accuracy, plain_accuracy = cached.evaluation["test"]["accuracy"], plain.evaluation["test"]["accuracy"]
    images = cached.feature_cache["images"]
    report({"benchmark": "finetune_cache", "backbone": args.backbone, "image_size": args.image_size,
            "strategy": args.strategy, "epochs": args.epochs, "fraction": args.fraction,
            **{f"{name}_images": split.count for name, split in splits.items()},
            "feature_cache": cached.feature_cache,
            "plain_seconds": round(plain_seconds, 1), "cached_seconds": round(cached_seconds, 1),
            "build_seconds": round(build_seconds, 1), "inference_seconds": round(inference_seconds, 1),
            "speedup": round(plain_seconds / cached_seconds, 2),
            "limit_ratio": round(cached_seconds / inference_seconds, 3),
            "limit_ratio_without_build": round((cached_seconds - build_seconds) / inference_seconds, 3),
            "rss_growth_per_image_kib": None if rss_growth is None else round(rss_growth / 1024 / images, 1),
            "plain_test_accuracy": plain_accuracy, "cached_test_accuracy": cached_accuracy,
            "accuracy_difference_points": round(100 * (cached_accuracy - plain_accuracy), 2)})


def one_pass(prefix, splits: dict, batch_size: int) -> float:
    """Seconds for the prefix to run over every split once, batches as the cache reads them."""
    step = tf.function(lambda images: prefix(images, training=False), reduce_retracing=True)
    started = time.perf_counter()
    for split in splits.values():
        for images, _ in dataset(split, batch_size):
            [part.numpy() for part in tf.nest.flatten(step(images))]
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
