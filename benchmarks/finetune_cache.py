"""Fine-tuning with the cached frozen prefix against the plain path: same data, epochs and seed.

    python -m benchmarks.finetune_cache [--fraction 0.2 --image-size 75 --epochs 10 --strategy 1]
    python -m benchmarks.finetune_cache --image-size 299 --strategy 2 --fraction 0.02 --pretrain-epochs 0 \
        --learning-rate 0.01 --repeats 3

What each field covers (all timings in this one process, after pretrain ran in its own):
- cached_seconds, plain_seconds: one whole train_classifier call: building the classifier (loading the
  pretrained model), for the cached run the one pass that writes the features to disk, training every
  epoch, and evaluating train, val and test. The cached run is repeated --repeats times (cached_seconds is
  the median, cached_seconds_runs each run), then the plain run goes once; speedup = plain / median cached;
- limit_ratio: a cached run's time over its own inference pass (the feature cache's `seconds`: the pass over
  every target image and the writing), both timed inside the same call, so under the same load; at least 1
  by construction. limit_ratio is the median over the repeats, limit_ratio_min/max and _runs the spread;
- rss_growth: the peak resident memory growth of the cache pass (Linux VmHWM, reset when the pass starts),
  each in a fresh process (benchmarks/cache_rss.py) over the first --rss-images target images and over all
  of them; rss_growth_slope_kib_per_image is the growth between those two counts over their difference,
  rss_growth_fixed_mib what is left at zero images (activations of a batch, traced functions, prefetch);
- pretrained model: the pretrain stage's after --pretrain-epochs, or with --pretrain-epochs 0 a randomly
  initialised classifier; either way its BatchNormalization statistics are then measured on source training
  images (common.pretrained_stand_in, which says why, and when a head learns from its features: the accuracy
  difference between the two paths says something only when both are well above chance). With --workspace
  the statistics are measured again, which leaves them as they were.

--fraction takes that share of every class of the CIFAR-10 archive, so train,
val and test keep the pipeline's proportions (0.2: 4,500 target training
images, 500 val, 1,000 test; 1: all 30,000).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

from benchmarks.cache_rss import in_fresh_process
from benchmarks.common import arguments, prepared, pretrained_stand_in, report
from transfer.config import load_params
from transfer.runtime import set_up
from transfer.training import open_task, train_classifier
from transfer.training_stage import run_for


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--backbone", default="inception_v3", choices=["small_cnn", "inception_v3"])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of every class of the archive")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="0: a random classifier stands in")
    parser.add_argument("--pretrained-from", type=Path,
                        help="with --pretrain-epochs 0: the weights of this pretrained model file (another "
                             "workspace's models/pretrained.keras, any image size) instead of random ones")
    parser.add_argument("--strategy", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, help="finetune.learning_rate (default: params.yaml's)")
    parser.add_argument("--repeats", type=int, default=3, help="cached runs, for the spread of limit_ratio")
    parser.add_argument("--rss-images", type=int, help="the smaller image count of rss_growth "
                                                       "(default: a quarter of the target images)")
    parser.add_argument("--frozen-pass", default="auto", choices=["auto", "bfloat16"],
                        help="dtype of the cache's inference pass (auto: the model's, as the stage runs it)")
    parser.add_argument("--workspace", type=Path,
                        help="reuse the records and pretrained model of an earlier run's workspace (its params)")
    args = parser.parse_args()
    overrides = {"model.backbone": args.backbone, "model.weights": "none", "preprocess.image_size": args.image_size,
                 "pretrain.epochs": max(1, args.pretrain_epochs), "finetune.epochs": args.epochs,
                 "strategy": args.strategy,
                 **({"finetune.learning_rate": args.learning_rate} if args.learning_rate else {})}
    stages = ("download", "split", "preprocess", *(["pretrain"] if args.pretrain_epochs else []))
    pretrained_from = args.pretrained_from and args.pretrained_from.resolve()  # before moving to the workspace
    prepared("finetune_cache", args, overrides, stages)
    pretrained_stand_in(args.backbone, args.image_size, trained=bool(args.pretrain_epochs),
                        weights_from=pretrained_from)
    workspace = Path.cwd()

    splits = open_task("target")
    params = load_params()
    settings = run_for("finetune", params).settings
    total = sum(split.count for split in splits.values())
    counts = sorted({args.rss_images or total // 4, total})
    rss = [in_fresh_process(workspace, images) for images in counts]

    def one_run(cache: bool) -> tuple[float, object]:
        runtime = set_up(params.training, params.finetune.seed)
        runtime = dataclasses.replace(runtime, frozen_pass_bfloat16=args.frozen_pass == "bfloat16")
        # No checkpoints: the comparison is of training, not of saving models.
        run = dataclasses.replace(run_for("finetune", params), cache_features=cache, checkpoints=False)
        started = time.perf_counter()
        result = train_classifier(run, splits, params, runtime)
        return time.perf_counter() - started, result

    cached_runs = [one_run(True) for _ in range(args.repeats)]
    for _, result in cached_runs:
        assert result.feature_cache["storage"] == "disk", result.feature_cache
    plain_seconds, plain = one_run(False)

    cached_times = [seconds for seconds, _ in cached_runs]
    limits = [seconds / result.feature_cache["seconds"] for seconds, result in cached_runs]
    cached = cached_runs[0][1]
    cached_seconds = statistics.median(cached_times)
    cached_accuracy, plain_accuracy = cached.evaluation["test"]["accuracy"], plain.evaluation["test"]["accuracy"]
    report({"benchmark": "finetune_cache", "backbone": args.backbone, "image_size": args.image_size,
            "strategy": args.strategy, "epochs": args.epochs, "fraction": args.fraction,
            "learning_rate": settings.learning_rate,
            "pretrained": (f"{args.pretrain_epochs} epochs" if args.pretrain_epochs else
                           f"weights of {args.pretrained_from}" if args.pretrained_from else "random weights"),
            **{f"{name}_images": split.count for name, split in splits.items()},
            "feature_cache": cached.feature_cache, "repeats": args.repeats,
            "plain_seconds": round(plain_seconds, 1), "cached_seconds": round(cached_seconds, 1),
            "cached_seconds_runs": [round(seconds, 1) for seconds in cached_times],
            "cache_pass_seconds_runs": [result.feature_cache["seconds"] for _, result in cached_runs],
            "speedup": round(plain_seconds / cached_seconds, 2),
            "limit_ratio": round(statistics.median(limits), 3), "limit_ratio_min": round(min(limits), 3),
            "limit_ratio_max": round(max(limits), 3), "limit_ratio_runs": [round(limit, 3) for limit in limits],
            **rss_fields(rss),
            "plain_test_accuracy": plain_accuracy, "cached_test_accuracy": cached_accuracy,
            "cached_test_accuracy_runs": [result.evaluation["test"]["accuracy"] for _, result in cached_runs],
            "accuracy_difference_points": round(100 * (cached_accuracy - plain_accuracy), 2)})


def rss_fields(rss: list[dict]) -> dict:
    """The growth at each image count, and the line through the first and last: slope and fixed part."""
    fields = {"rss_growth": [{"images": r["images"], "peak_rss_growth_mib": r["peak_rss_growth_mib"]} for r in rss]}
    if len(rss) < 2 or any(r["peak_rss_growth_mib"] is None for r in rss):
        return fields  # one image count, or not on Linux: no line
    (few, few_mib), (many, many_mib) = [(r["images"], r["peak_rss_growth_mib"]) for r in (rss[0], rss[-1])]
    slope_mib = (many_mib - few_mib) / (many - few)
    return {**fields, "rss_growth_slope_kib_per_image": round(1024 * slope_mib, 1),
            "rss_growth_fixed_mib": round(few_mib - slope_mib * few, 1)}


if __name__ == "__main__":
    main()
