"""The pretrain stage with a frozen InceptionV3 base (pretrain.trainable_base_layers), as the frozen-pretrain
profile runs it: wall time of `python -m stages.pretrain`, TensorFlow's start and model building included.

    python -m benchmarks.frozen_pretrain [--image-size 299 --fraction 0.05 --trainable-base-layers 0]

Random weights stand in for ImageNet's (they cannot be downloaded here); the time does not depend on
the weights' values. --fraction takes that share of every class of the archive (0.05: 1,125 source
training images, 125 val, 250 test).
"""

from __future__ import annotations

import json
import time

from benchmarks.common import archive_share, arguments, report, run_stages, workspace
from transfer.paths import metrics_file


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--fraction", type=float, default=0.05, help="share of every class of the archive")
    parser.add_argument("--epochs", type=int, default=10, help="pretrain epochs")
    parser.add_argument("--trainable-base-layers", default="0", help="pretrain.trainable_base_layers")
    args = parser.parse_args()
    if args.fraction < 1:
        args.archive, args.md5 = archive_share(args.archive, args.fraction, args.workdir)
    layers = args.trainable_base_layers if args.trainable_base_layers == "all" else int(args.trainable_base_layers)
    workspace("frozen_pretrain", args, {"model.weights": "none", "preprocess.image_size": args.image_size,
                                        "pretrain.epochs": args.epochs, "pretrain.trainable_base_layers": layers})
    run_stages("download", "split", "preprocess")
    started = time.perf_counter()
    run_stages("pretrain")
    seconds = time.perf_counter() - started
    metrics = json.loads(metrics_file("pretrain").read_text())
    images = metrics["feature_cache"]["images"]
    report({"benchmark": "frozen_pretrain", "backbone": "inception_v3", "image_size": args.image_size,
            "fraction": args.fraction, "epochs": args.epochs, "trainable_base_layers": layers,
            "source_images": images, "stage_seconds": round(seconds, 1),
            "feature_cache": metrics["feature_cache"], "train_seconds": metrics["timing"]["train_seconds"],
            "test_accuracy": metrics["test"]["accuracy"],
            "stage_seconds_per_1000_images": round(1000 * seconds / max(images, 1), 1)})


if __name__ == "__main__":
    main()
