"""Whether two finished copies of the project hold the same results: what benchmarks/kill_sweep.py (and
tests/test_faults.py through it) compares a killed and resumed run with an uninterrupted one by."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import yaml

from benchmarks.timed_repro import Run

TRACEBACK = "Traceback (most recent call last)"
# Every file the pipeline writes that must be equal between the runs (models and metrics JSON apart).
SAME_TEXT = ("metrics/pretrain_history.csv", "metrics/baseline_history.csv", "metrics/finetune_history.csv",
             "metrics/finetune_predictions.csv", "models/export/labels.txt", "models/export/MODEL_CARD.md")
METRICS = ("metrics/pretrain.json", "metrics/baseline.json", "metrics/finetune.json")
DATA = ("data/cifar-10-python.tar.gz", "data/split", "data/tfrecords")  # compared by their md5 in dvc.lock
MODELS = ("models/pretrained.keras", "models/finetuned.keras")
FIGURES = Path("metrics/figures")
TFLITE = Path("models/export/model.tflite")  # byte for byte the same from run to run, unlike the SavedModel's files
SAVED_MODEL = Path("models/export/saved_model")
# Measured, not computed: they differ from run to run like the timing block.
TIMING_FIELDS = (("timing",), ("feature_cache", "seconds"), ("feature_cache", "peak_rss_growth_mib"))


def without_timing(metrics: dict) -> dict:
    for path in TIMING_FIELDS:
        section = metrics
        for key in path[:-1]:
            section = section.get(key) or {}
        section.pop(path[-1], None)
    return metrics


def model_weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(path).get_weights()


def differences(project: Path, reference: Path) -> list[str]:
    """What the two finished projects' outputs differ in (empty: the same results)."""
    found = []
    for name in METRICS:
        ours, theirs = (without_timing(json.loads((folder / name).read_text())) for folder in (project, reference))
        if ours != theirs:
            found.append(f"{name}: {ours} != {theirs}")
    ours, theirs = (locked_md5s(folder) for folder in (project, reference))
    found += [f"{name}: md5 {ours.get(name)} != {theirs.get(name)}" for name in DATA
              if ours.get(name) != theirs.get(name)]
    for name in SAME_TEXT:
        if (project / name).read_text() != (reference / name).read_text():
            found.append(f"{name} differs")
    ours, theirs = (sorted(path.relative_to(folder) for path in (folder / FIGURES).iterdir())
                    for folder in (project, reference))
    if ours != theirs:
        found.append(f"{FIGURES}: {ours} != {theirs}")
    found += [f"{name} differs" for name in [*ours, TFLITE]
              if (project / name).read_bytes() != (reference / name).read_bytes()]
    for name, weights in [(name, model_weights) for name in MODELS] + [(SAVED_MODEL, saved_model_weights)]:
        ours, theirs = weights(project / name), weights(reference / name)
        if len(ours) != len(theirs) or not all(np.array_equal(a, b) for a, b in zip(ours, theirs)):
            found.append(f"{name}: weights differ")
    return found


def locked_md5s(project: Path) -> dict[str, str]:
    """Every output's md5 as dvc.lock records it."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out.get("md5") for stage in lock["stages"].values() for out in stage.get("outs", [])}


def saved_model_weights(path: Path) -> list[np.ndarray]:
    """The SavedModel's float variables in the order it lists them. Its files differ between two uninterrupted
    runs: the protobufs, the order of its `_all_variables` and Dropout's random seed state (an int64 pair that the
    export does not seed and serving never uses)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    names = [name for name, dtype in reader.get_variable_to_dtype_map().items()
             if name.startswith("variables/") and dtype.is_floating]
    return [reader.get_tensor(name) for name in sorted(names, key=lambda name: int(name.split("/")[1]))]


# transfer/outputs.py's siblings of an output being replaced: `.<name>.tmp-<pid>`, `.new-<pid>`, `.old-<pid>`.
SIBLING = re.compile(r"^\..+\.(?:tmp|new|old)-\d+")


def temporaries(project: Path) -> list[str]:
    """Half-replaced outputs' siblings anywhere in the project but DVC's and git's folders."""
    found = []
    for folder, subfolders, files in os.walk(project):
        subfolders[:] = [name for name in subfolders if name not in (".dvc", ".git")]
        found += [str((Path(folder) / name).relative_to(project)) for name in subfolders + files
                  if SIBLING.match(name)]
    return sorted(found)


def problems(project: Path, runs: list[Run]) -> list[str]:
    """What the finished, killed project must not show: DVC changes, leftovers, tracebacks."""
    found = []
    status = subprocess.run(["dvc", "status"], cwd=project, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if status.returncode != 0 or "up to date" not in status.stdout:
        found.append(f"dvc status is not clean: {status.stdout.strip()} {status.stderr.strip()}")
    found += [f"left behind: {name}" for name in temporaries(project)]
    checkpoints = project / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        found.append(f"left behind: {sorted(str(p.relative_to(project)) for p in checkpoints.rglob('*'))}")
    found += [f"run {run.index} printed a traceback:\n{run.stderr}" for run in runs
              if TRACEBACK in run.stdout or TRACEBACK in run.stderr]
    return found
