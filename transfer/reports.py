"""The CSV files DVC plots, and reading another stage's metrics JSON (the schema: transfer/training_stage.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transfer.errors import PipelineError
from transfer.outputs import write_text


def write_history(path: Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch, one row each, for DVC's plots; a warm-head run's rows say their phase."""
    phases = ["phase"] if any("phase" in entry for entry in history) else []
    columns = ["epoch", *phases, "loss", "accuracy", "val_loss", "val_accuracy"]
    rows = [",".join(columns)]
    rows += [",".join(f"{entry.get(column, float('nan')):.6g}" for column in columns) for entry in history]
    write_text(path, "\n".join(rows) + "\n")


def write_predictions(path: Path, labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...]) -> None:
    """One row per test image, for DVC's confusion-matrix template."""
    rows = ["actual,predicted"] + [f"{class_names[a]},{class_names[p]}" for a, p in zip(labels, predicted)]
    write_text(path, "\n".join(rows) + "\n")


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
