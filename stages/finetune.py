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

from transfer import checkpoints, strategies
from transfer.config import load_params
from transfer.errors import run_stage
from transfer.models import Description, save_model
from transfer.outputs import write_json
from transfer.paths import FINETUNED_MODEL, PREDICTIONS, history_file, metrics_file
from transfer.reports import metrics_report, read_metrics, write_history, write_predictions
from transfer.runtime import set_up
from transfer.training import PRETRAINED, Run, open_task, train_classifier

STAGE = "finetune"


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    strategy = params.chosen_strategy()
    runtime = set_up(params.training, params.finetune.seed)  # first: a multi-worker distribution must exist
    splits = open_task("target")  # every shard read once: a damaged one is named before anything else
    baseline = read_metrics(metrics_file("baseline"), made_by="baseline")
    run = Run(stage=STAGE, init=PRETRAINED if strategy.base_weights == "pretrained" else "none",
              strategy=strategy, settings=strategies.settings(params.finetune, strategy), seed=params.finetune.seed,
              labels_per_class=params.data.target_labels_per_class, cache_features=params.finetune.cache_features)
    result = train_classifier(run, splits, params, runtime)
    # The model carries its class names and how its images were stored: predict and export read them there.
    save_model(result.model, FINETUNED_MODEL, runtime, Description(result.classes, splits["test"].storage))
    if not runtime.chief:
        print(f"{STAGE}: training done; the chief writes the outputs")
        return
    write_history(history_file(STAGE), result.progress.history)
    write_predictions(PREDICTIONS, result.test_labels, result.test_predicted, result.classes)
    report = metrics_report(result, params.strategy, runtime, time.perf_counter() - started, baseline)
    write_json(metrics_file(STAGE), report)
    checkpoints.finish(STAGE)
    print(f"{STAGE}: strategy {params.strategy}, {result.trainable_params:,} trainable parameters, target test "
          f"accuracy {report['test']['accuracy']:.4f} ({report['gain_over_scratch']:+.4f} over scratch) "
          f"-> {FINETUNED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
