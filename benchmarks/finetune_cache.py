"""Fine-tuning with the cached frozen prefix against the plain path: same data, epochs and seed.

Both runs time the whole fine-tune: for the cached path that includes running
the frozen network once over train, val and test.

    python -m benchmarks.finetune_cache [--fraction 0.2 --image-size 75 --epochs 10 --strategy 1]

--fraction takes that share of every class of the CIFAR-10 archive, so train,
val and test keep the pipeline's proportions (0.2: 4,500 target training
images, 500 val, 1,000 test; 1: all 30,000).
"""

from __future__ import annotations

import time

from benchmarks.common import archive_share, arguments, report, run_stages, workspace
from transfer import strategies
from transfer.config import load_params
from transfer.runtime import set_up
from transfer.training import PRETRAINED, Run, open_task, train_classifier


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--backbone", default="inception_v3", choices=["small_cnn", "inception_v3"])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of every class of the archive")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--strategy", type=int, default=1)
    args = parser.parse_args()
    if args.fraction < 1:
        args.archive, args.md5 = archive_share(args.archive, args.fraction, args.workdir)
    workspace("finetune_cache", args, {
        "model.backbone": args.backbone, "model.weights": "none", "preprocess.image_size": args.image_size,
        "pretrain.epochs": args.pretrain_epochs,
        "finetune.epochs": args.epochs, "strategy": args.strategy,
    })
    run_stages("download", "split", "preprocess", "pretrain")

    splits = open_task("target")
    results = {}
    for cache in (False, True):
        params = load_params()
        runtime = set_up(params.training, params.finetune.seed)
        chosen = params.chosen_strategy()
        # No checkpoints: the comparison is of training, not of saving models.
        run = Run(stage="finetune", init=PRETRAINED, strategy=chosen,
                  settings=strategies.settings(params.finetune, chosen), seed=params.finetune.seed,
                  cache_features=cache, checkpoints=False)
        started = time.perf_counter()
        result = train_classifier(run, splits, params, runtime)  # timed: building the model, training, evaluating
        results["cached" if cache else "plain"] = (time.perf_counter() - started, result.evaluation["test"]["accuracy"])
    (plain_seconds, plain_accuracy), (cached_seconds, cached_accuracy) = results["plain"], results["cached"]
    report({"benchmark": "finetune_cache", "backbone": args.backbone, "image_size": args.image_size,
            "strategy": args.strategy, "epochs": args.epochs, "fraction": args.fraction,
            **{f"{name}_images": split.count for name, split in splits.items()},
            "plain_seconds": round(plain_seconds, 1), "cached_seconds": round(cached_seconds, 1),
            "speedup": round(plain_seconds / cached_seconds, 2),
            "plain_test_accuracy": plain_accuracy, "cached_test_accuracy": cached_accuracy,
            "accuracy_difference_points": round(100 * (cached_accuracy - plain_accuracy), 2)})


if __name__ == "__main__":
    main()
