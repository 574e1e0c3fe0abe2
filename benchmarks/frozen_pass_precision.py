"""The feature cache's inference pass in bfloat16 against float32: test accuracy, predictions and speed.

Two cached fine-tunes in one process from the same pretrained model, seed and data, differing only in
the dtype the frozen prefix computes in (features are stored in float16 either way):

    python -m benchmarks.frozen_pass_precision --image-size 299 --strategy 2 --fraction 0.02 --pretrain-epochs 1

--workspace reuses a folder that benchmarks.finetune_cache left (its records and pretrained model) instead
of building a new one. --pretrain-epochs 0 skips pretraining: a randomly initialised InceptionV3 classifier
stands in for the pretrained model (see common.pretrained_stand_in for when a head learns from it).
pass_speedup is the float32 pass's time over the bfloat16 pass's (>1: bfloat16 faster).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from benchmarks.common import arguments, prepared, pretrained_stand_in, report
from transfer.config import load_params
from transfer.runtime import set_up
from transfer.training import open_task, train_classifier
from transfer.training_stage import run_for


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...) from /proc/cpuinfo; empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--fraction", type=float, default=0.02, help="share of every class of the archive")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="0: a random classifier stands in")
    parser.add_argument("--strategy", type=int, default=2)
    parser.add_argument("--workspace", type=Path, help="an existing benchmark workspace to reuse")
    args = parser.parse_args()
    overrides = {"model.weights": "none", "preprocess.image_size": args.image_size,
                 "pretrain.epochs": max(1, args.pretrain_epochs), "finetune.epochs": args.epochs,
                 "strategy": args.strategy}
    stages = ("download", "split", "preprocess", *(["pretrain"] if args.pretrain_epochs else []))
    if prepared("frozen_pass_precision", args, overrides, stages) and not args.pretrain_epochs:
        pretrained_stand_in("inception_v3", args.image_size, trained=False)
    splits = open_task("target")
    params = load_params()
    results = {}
    for bfloat16 in (False, True):
        runtime = dataclasses.replace(set_up(params.training, params.finetune.seed), frozen_pass_bfloat16=bfloat16)
        run = dataclasses.replace(run_for("finetune", params), cache_features=True, checkpoints=False)
        results[bfloat16] = train_classifier(run, splits, params, runtime)
    single, half = results[False], results[True]
    assert half.feature_cache["computed_in"] == "bfloat16", half.feature_cache
    report({"benchmark": "frozen_pass_precision", "image_size": params.preprocess.image_size,
            "strategy": params.strategy, "epochs": params.finetune.epochs, "test_images": splits["test"].count,
            "cpu_has": sorted(cpu_flags() & {"avx2", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "float32_test_accuracy": single.evaluation["test"]["accuracy"],
            "bfloat16_test_accuracy": half.evaluation["test"]["accuracy"],
            "accuracy_difference_points": round(100 * (half.evaluation["test"]["accuracy"]
                                                       - single.evaluation["test"]["accuracy"]), 2),
            "test_predictions_changed": int(np.sum(single.test_predicted != half.test_predicted)),
            "pass_speedup": round(single.feature_cache["seconds"] / half.feature_cache["seconds"], 2)})


if __name__ == "__main__":
    main()
