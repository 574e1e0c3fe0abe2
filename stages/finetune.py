"""Stage: fine-tune the pretrained base on the target task with the chosen strategy.

A fresh head replaces the source head; `strategies[strategy]` says which base
layers train. The base's BatchNorm layers keep their statistics (inference
mode) whatever trains, unless it starts from random weights. With
finetune.cache_features the frozen part of the network runs once over every
split and only the trainable rest trains on its output. finetune.json reports
`gain_over_scratch`: test accuracy minus the baseline stage's (the same network
trained from random weights).
"""

from __future__ import annotations

import time

from transfer.config import load_params
from transfer.errors import run_stage
from transfer.models import Description, save_model
from transfer.paths import FINETUNED_MODEL, PREDICTIONS, metrics_file
from transfer.reports import read_metrics, write_predictions
from transfer.runtime import set_up
from transfer.training import open_task, train_classifier
from transfer.training_stage import finish, run_for


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    run = run_for("finetune", params)
    runtime = set_up(params.training, run.seed)  # first: a multi-worker distribution must exist
    splits = open_task("target")  # every shard read once: a damaged one is named before anything else
    baseline = read_metrics(metrics_file("baseline"), made_by="baseline")
    result = train_classifier(run, splits, params, runtime)
    # The model carries its class names and how its images were stored: predict and export read them there.
    save_model(result.model, FINETUNED_MODEL, runtime, Description(result.classes, splits["test"].storage))
    if runtime.chief:
        write_predictions(PREDICTIONS, result.test_labels, result.test_predicted, result.classes)
    if report := finish(run, result, runtime, started, params.strategy, baseline):
        print(f"finetune: strategy {params.strategy}, {result.trainable_params:,} trainable parameters, target "
              f"test accuracy {report['test']['accuracy']:.4f} ({report['gain_over_scratch']:+.4f} over scratch) "
              f"-> {FINETUNED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
