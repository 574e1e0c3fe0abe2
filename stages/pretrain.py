"""Stage: pretrain backbone + head on the source task.

By default the whole network trains (BatchNorm in training mode), initialised
from model.weights, and an interrupted run continues where it stopped
(transfer/checkpoints.py). With pretrain.trainable_base_layers (or
frozen_base_layers) the base's first layers stay frozen as in finetune's
strategies: they keep their weights and BatchNorm statistics, run once over
the images, and only the rest trains on their cached output (from ImageNet or
a weights file, the BatchNorm layers that train keep their statistics too).
"""

from __future__ import annotations

import time

from transfer import checkpoints, strategies
from transfer.config import load_params
from transfer.errors import run_stage
from transfer.models import save_model
from transfer.outputs import write_json
from transfer.paths import PRETRAINED_MODEL, history_file, metrics_file
from transfer.reports import metrics_report, write_history
from transfer.runtime import set_up
from transfer.training import Run, open_task, train_classifier

STAGE = "pretrain"


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    runtime = set_up(params.training, params.seed)  # first: a multi-worker distribution must exist before TF starts
    freezing = strategies.pretraining(params)
    run = Run(stage=STAGE, init=params.model.weights, strategy=freezing, settings=params.pretrain,
              seed=params.seed, cache_features=freezing is not None)
    result = train_classifier(run, open_task("source"), params, runtime)
    save_model(result.model, PRETRAINED_MODEL, runtime)
    if not runtime.chief:
        print(f"{STAGE}: training done; the chief evaluates and writes the outputs")
        return
    write_history(history_file(STAGE), result.progress.history)
    write_json(metrics_file(STAGE), metrics_report(result, None, runtime, time.perf_counter() - started))
    checkpoints.finish(STAGE)
    print(f"{STAGE}: source test accuracy {result.evaluation['test']['accuracy']:.4f} -> {PRETRAINED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
