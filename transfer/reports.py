"""What a training stage reports: the one metrics schema, and the CSV files DVC plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transfer.errors import PipelineError
from transfer.outputs import write_text

if TYPE_CHECKING:
    from transfer.runtime import Runtime
    from transfer.training import Result


def write_history(path: Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch, one row each, for DVC's plots."""
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    rows = [",".join(columns)]
    rows += [",".join(f"{entry.get(column, float('nan')):.6g}" for column in columns) for entry in history]
    write_text(path, "\n".join(rows) + "\n")


def write_predictions(path: Path, labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...]) -> None:
    """One row per test image, for DVC's confusion-matrix template."""
    rows = ["actual,predicted"] + [f"{class_names[a]},{class_names[p]}" for a, p in zip(labels, predicted)]
    write_text(path, "\n".join(rows) + "\n")


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


def read_metrics(path: Path, made_by: str) -> dict:
    """A metrics JSON another stage wrote; missing or damaged is one line naming it and the stage."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the {made_by} stage (dvc repro)") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON ({error}); rerun the {made_by} stage") from None
    if "live" in metrics:  # an interrupted run's last epoch (training.EpochRecorder), not its results
        live = metrics["live"]
        raise PipelineError(f"{path} is from an unfinished {made_by} run (epoch {live.get('epoch')} of "
                            f"{live.get('epochs')}): rerun the {made_by} stage (dvc repro)")
    return metrics
