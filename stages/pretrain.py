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

from transfer.config import load_params
from transfer.errors import run_stage
from transfer.models import save_model
from transfer.paths import PRETRAINED_MODEL
from transfer.runtime import set_up
from transfer.training import open_task, train_classifier
from transfer.training_stage import finish, run_for


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    run = run_for("pretrain", params)
    runtime = set_up(params.training, run.seed)  # first: a multi-worker distribution must exist before TF starts
    result = train_classifier(run, open_task("source"), params, runtime)
    save_model(result.model, PRETRAINED_MODEL, runtime)
    if finish(run, result, runtime, started, strategy=None):
        print(f"pretrain: source test accuracy {result.evaluation['test']['accuracy']:.4f} -> {PRETRAINED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
