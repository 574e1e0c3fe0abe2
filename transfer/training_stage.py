"""What every training stage does around the trainer: the run it asks for, and its one ending.

A training stage reads as: load the params, `run_for` its stage, set up the runtime, `train_classifier`,
save the model, `finish` (history CSV, metrics JSON in the one schema of `metrics_report`, checkpoint done).
"""

from __future__ import annotations

import time
from pathlib import Path

from transfer import checkpoints, strategies
from transfer.config import Params
from transfer.outputs import write_json
from transfer.paths import history_file, metrics_file
from transfer.reports import write_history
from transfer.runtime import Runtime
from transfer.training import PRETRAINED, Result, Run, TrainingStage


def run_for(stage: TrainingStage, params: Params) -> Run:
    """What `stage` asks of the trainer, from the params: pretrain trains on the source task from
    model.weights with pretrain's freezing rule; baseline on the target task from random weights with
    strategies.0; finetune on the target task from models/pretrained.keras (or random weights, as its
    base_weights says) with strategies[strategy] (its phases: transfer/strategies.py's phases)."""
    if stage == "pretrain":
        freezing = strategies.pretraining(params)
        weights = params.model.weights
        init = weights if weights in ("imagenet", "none") else Path(weights)
        return Run(stage, init, freezing, params.pretrain, params.seed, cache_features=freezing is not None)
    strategy = strategies.baseline(params) if stage == "baseline" else params.chosen_strategy()
    return Run(stage, PRETRAINED if strategy.base_weights == "pretrained" else "none", strategy,
               strategies.settings(params.finetune, strategy), params.finetune.seed,
               labels_per_class=params.data.target_labels_per_class, cache_features=params.finetune.cache_features)


def finish(run: Run, result: Result, runtime: Runtime, started: float, strategy: int | None,
           baseline: dict | None = None) -> dict | None:
    """End a training stage that started at `started` (time.perf_counter()): its history CSV, its metrics JSON
    (see metrics_report) and its checkpoint, now done. Only the chief writes: None on the other workers."""
    if not runtime.chief:
        print(f"{run.stage}: training done; the chief evaluates and writes the outputs")
        return None
    write_history(history_file(run.stage), result.progress.history)
    report = metrics_report(result, strategy, runtime, time.perf_counter() - started, baseline)
    write_json(metrics_file(run.stage), report)
    checkpoints.finish(run.stage)
    return report


def metrics_report(result: Result, strategy: int | None, runtime: Runtime, stage_seconds: float,
                   baseline: dict | None = None) -> dict:
    """The metrics JSON of a training stage; target-task runs (a strategy) add how many images trained,
    and finetune its gain over the from-scratch `baseline` (test accuracy minus the baseline's).

    Every score is of the kept model: `kept_epoch` (1-based) is the epoch training.keep (`keep`) chose."""
    progress = result.progress
    report = {
        "strategy": strategy,
        "trainable_params": result.trainable_params,
        "total_params": result.model.count_params(),
        **result.evaluation,
        "epochs": progress.epochs_done,
        "keep": result.keep,  # training.keep: the saved and evaluated model is the best or the last epoch
        "kept_epoch": result.kept_epoch,
        "timing": {
            "wall_seconds": round(stage_seconds, 1),
            "train_seconds": round(progress.seconds, 1),
            "train_images_per_second": round(progress.images_seen / max(progress.seconds, 1e-9), 1),
        },
        "runtime": {"gpus": runtime.gpus, "mixed_precision": runtime.mixed_precision,
                    "jit_compile": runtime.jit_compile, "distribute": runtime.distribute,
                    "replicas": runtime.replicas, "workers": runtime.workers},
        "feature_cache": result.feature_cache,  # how the frozen prefix's output was cached, or why not
    }
    if strategy is not None:
        report["train_images"] = result.train_images
    if baseline is not None:
        report["gain_over_scratch"] = round(report["test"]["accuracy"] - baseline["test"]["accuracy"], 6)
    return report
