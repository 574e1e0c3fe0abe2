"""Training and evaluation shared by pretrain and finetune.

Runtime set-up (seeds, determinism, mixed precision, XLA), compiling,
resumable fit() with per-epoch checkpoints, and the metrics both stages report.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from transfer.config import Train
from transfer.outputs import atomic_output, remove, write_text

EVAL_BATCH = 256


@dataclass(frozen=True)
class Runtime:
    gpus: int
    mixed_precision: bool
    jit_compile: bool


def set_up(train: Train, seed: int) -> Runtime:
    """Seed everything and pick mixed precision and XLA (auto: on when a GPU is present)."""
    keras.utils.set_random_seed(seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = len(tf.config.list_physical_devices("GPU"))
    mixed = bool(gpus) if train.mixed_precision == "auto" else train.mixed_precision
    jit = bool(gpus) if train.jit_compile == "auto" else train.jit_compile
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    return Runtime(gpus, mixed, jit)


def compile_model(model: keras.Model, learning_rate: float, train: Train, runtime: Runtime,
                  optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """(Re)compile; needed after every change of `trainable`."""
    model.compile(
        optimizer=optimizer or keras.optimizers.RMSprop(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        steps_per_execution=train.steps_per_execution,
        jit_compile=runtime.jit_compile,
    )


def fingerprint(*parts: object) -> str:
    """A hash of everything a checkpoint depends on; a changed one discards the checkpoint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Progress:
    """What a (possibly resumed) training run has done so far."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0

    @property
    def epochs_done(self) -> int:
        return len(self.history)


class EpochRecorder(keras.callbacks.Callback):
    """Record each epoch in `progress`; with a folder, also checkpoint model and progress.

    Model (with optimizer state) and progress are saved together as one atomic
    folder, so a kill at any moment leaves either the old or the new checkpoint.
    """

    def __init__(self, progress: Progress, images_per_epoch: int, folder: Path | None, key: str):
        super().__init__()
        self.progress, self.images_per_epoch = progress, images_per_epoch
        self.folder, self.key = folder, key

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.progress.seconds += time.perf_counter() - self.started
        self.progress.images_seen += self.images_per_epoch
        self.progress.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        if self.folder is None:
            return
        with atomic_output(self.folder / "latest") as latest:
            latest.mkdir()
            self.model.save(latest / "model.keras")
            state = {"fingerprint": self.key, **self.progress.__dict__}
            (latest / "state.json").write_text(json.dumps(state, indent=2))


def resume(folder: Path, key: str) -> tuple[keras.Model | None, Progress]:
    """The checkpointed model and progress if they belong to this run; stale ones are deleted."""
    state_file = folder / "latest" / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.pop("fingerprint") == key:
            model = keras.models.load_model(folder / "latest" / "model.keras")
            print(f"resuming from {folder} after epoch {len(state['history'])}")
            return model, Progress(**state)
        print(f"discarding checkpoint in {folder}: params or inputs changed")
    remove(folder)
    return None, Progress()


def fit(model: keras.Model, train_data, val_data, epochs: int, progress: Progress, images_per_epoch: int,
        checkpoints: Path | None = None, key: str = "") -> Progress:
    """Train up to `epochs` in total, continuing after progress.epochs_done."""
    if progress.epochs_done < epochs:
        recorder = EpochRecorder(progress, images_per_epoch, checkpoints, key)
        model.fit(train_data, validation_data=val_data, epochs=epochs, initial_epoch=progress.epochs_done,
                  callbacks=[recorder], verbose=2, shuffle=False)  # datasets shuffle themselves
    return progress


def predict(model: keras.Model, data) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, class probabilities) over a dataset of (inputs, labels), in inference mode."""
    step = tf.function(lambda inputs: model(inputs, training=False))
    labels, probabilities = [], []
    for inputs, batch_labels in data:
        probabilities.append(np.asarray(step(inputs), dtype=np.float64))
        labels.append(batch_labels.numpy())
    return np.concatenate(labels), np.concatenate(probabilities)


def scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "loss": float(np.mean(-np.log(np.clip(picked, 1e-7, 1.0)))),
    }


def per_class(labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """Per-class accuracy (the share of a class's images classified right, i.e. its recall), per-class
    precision, recall and F1, and their macro F1."""
    classes = len(class_names)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    hits = np.diag(confusion).astype(float)
    precision = np.divide(hits, confusion.sum(axis=0), out=np.zeros(classes), where=confusion.sum(axis=0) > 0)
    recall = np.divide(hits, confusion.sum(axis=1), out=np.zeros(classes), where=confusion.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(classes),
                   where=(precision + recall) > 0)
    report = {
        name: {"precision": round(float(p), 6), "recall": round(float(r), 6), "f1": round(float(f), 6)}
        for name, p, r, f in zip(class_names, precision, recall, f1)
    }
    return {
        "macro_f1": round(float(f1.mean()), 6),
        "per_class_accuracy": {name: round(float(r), 6) for name, r in zip(class_names, recall)},
        "per_class": report,
    }


def evaluate_splits(model: keras.Model, splits: dict, class_names: tuple[str, ...]) -> tuple[dict, np.ndarray,
                                                                                          np.ndarray]:
    """{split: {accuracy, loss}} plus the test set's per-class report; returns test labels and predictions."""
    results, test = {}, None
    for name, data in splits.items():
        labels, probabilities = predict(model, data)
        results[name] = {key: round(value, 6) for key, value in scores(labels, probabilities).items()}
        if name == "test":
            test = (labels, probabilities.argmax(axis=1))
            results[name].update(per_class(*test, class_names))
    return results, *test


def write_history(path: Path, history: list[dict]) -> None:
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    rows = [",".join(columns)]
    rows += [",".join(f"{entry.get(column, float('nan')):.6g}" for column in columns) for entry in history]
    write_text(path, "\n".join(rows) + "\n")


def write_predictions(path: Path, labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...]) -> None:
    """One row per test image, for DVC's confusion-matrix template."""
    rows = ["actual,predicted"] + [f"{class_names[a]},{class_names[p]}" for a, p in zip(labels, predicted)]
    write_text(path, "\n".join(rows) + "\n")


def metrics_report(*, strategy: object, model: keras.Model, trainable_params: int, evaluation: dict,
                   progress: Progress, stage_seconds: float, runtime: Runtime) -> dict:
    return {
        "strategy": strategy,
        "trainable_params": trainable_params,
        "total_params": model.count_params(),
        **evaluation,
        "epochs": progress.epochs_done,
        "timing": {
            "wall_seconds": round(stage_seconds, 1),
            "train_seconds": round(progress.seconds, 1),
            "train_images_per_second": round(progress.images_seen / max(progress.seconds, 1e-9), 1),
        },
        "runtime": {"gpus": runtime.gpus, "mixed_precision": runtime.mixed_precision,
                    "jit_compile": runtime.jit_compile},
    }

