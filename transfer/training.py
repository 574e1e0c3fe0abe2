"""Training and evaluation shared by pretrain and finetune.

Runtime set-up (distribution strategy, seeds, determinism, mixed precision, XLA),
compiling, resumable fit() with per-epoch checkpoints, and the metrics both stages report.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from transfer import checkpoints
from transfer.checkpoints import Checkpoints, Progress
from transfer.config import Train
from transfer.errors import PipelineError
from transfer.outputs import atomic_output, write_text

EVAL_BATCH = 256


@dataclass(frozen=True)
class Runtime:
    gpus: int
    mixed_precision: bool
    jit_compile: bool
    strategy: tf.distribute.Strategy
    distribute: str  # none | mirrored | multi_worker, after resolving auto
    workers: int
    chief: bool  # only the chief writes models, metrics and checkpoints

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def set_up(train: Train, seed: int) -> Runtime:
    """Pick the distribution strategy, seed everything, pick mixed precision and XLA (auto: on with a GPU).

    Call it before anything else touches TensorFlow: MultiWorkerMirroredStrategy
    must exist before TensorFlow starts its runtime.
    """
    workers, chief = cluster()
    gpus = len(tf.config.list_physical_devices("GPU"))
    distribute = train.distribute
    if distribute == "auto":
        distribute = "multi_worker" if workers > 1 else "mirrored" if gpus > 1 else "none"
    if distribute == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif distribute == "mirrored":
        # One replica per GPU; without GPUs, one per (logical) CPU device.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    else:
        strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    mixed = bool(gpus) if train.mixed_precision == "auto" else train.mixed_precision
    # Keras silently turns XLA off under op determinism (not every XLA kernel is deterministic).
    if train.jit_compile is True and train.deterministic:
        raise PipelineError("train.jit_compile=true needs train.deterministic=false: "
                            "Keras does not compile with XLA under TF op determinism")
    jit = bool(gpus) and not train.deterministic if train.jit_compile == "auto" else train.jit_compile
    # float16 is far slower than float32 on a CPU; bfloat16 has hardware support on recent ones
    # (AVX512-BF16, AMX). See BENCHMARKS.md, "Mixed precision on the CPU".
    keras.mixed_precision.set_global_policy(("mixed_float16" if gpus else "mixed_bfloat16") if mixed else "float32")
    if distribute != "multi_worker":  # every process trains on its own
        workers, chief = 1, True
    runtime = Runtime(gpus, mixed, jit, strategy, distribute, workers, chief)
    if runtime.replicas > 1:
        print(f"training with {distribute} over {runtime.replicas} replicas on {runtime.workers} worker(s)"
              + ("" if chief else "; the chief writes every output"))
    return runtime


def cluster() -> tuple[int, bool]:
    """(workers that TF_CONFIG names, whether this process is the chief); (1, True) without TF_CONFIG."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 1, True
    try:
        config = json.loads(raw)
        jobs = config.get("cluster", {})
        task_type, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise PipelineError(f"TF_CONFIG is not a valid cluster description ({error!r}); see README 'Scaling up'") \
            from None
    workers = len(jobs.get("chief", [])) + len(jobs.get("worker", []))
    # Without a "chief" job, worker 0 is the chief (TensorFlow's own rule).
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in jobs)
    return workers, chief


def global_batch(batch_size: int, runtime: Runtime) -> int:
    """params' batch sizes are per replica: every replica gets batch_size images per step."""
    return batch_size * runtime.replicas


def compile_model(model: keras.Model, learning_rate: float, train: Train, runtime: Runtime,
                  optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """(Re)compile in the strategy's scope; needed after every change of `trainable`.

    The learning rate is used as given whatever the number of replicas (see README "Scaling up").
    """
    with runtime.strategy.scope():
        model.compile(
            optimizer=optimizer or keras.optimizers.RMSprop(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
            # Keras 3 cannot run several steps per execution over several replicas (keras-team/keras#19246).
            steps_per_execution=train.steps_per_execution if runtime.replicas == 1 else 1,
            jit_compile=runtime.jit_compile,
        )


class EpochRecorder(keras.callbacks.Callback):
    """Record each epoch in `progress`, print it, and checkpoint model and progress when given checkpoints."""

    def __init__(self, progress: Progress, epochs: int, images_per_epoch: int, checkpoints: Checkpoints | None,
                 runtime: Runtime):
        super().__init__()
        self.progress, self.epochs, self.images_per_epoch = progress, epochs, images_per_epoch
        self.checkpoints, self.runtime = checkpoints, runtime

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.started
        self.progress.seconds += seconds
        self.progress.images_seen += self.images_per_epoch
        logs = {name: float(value) for name, value in (logs or {}).items()}
        self.progress.history.append({"epoch": epoch + 1, **logs})
        shown = " - ".join(f"{name} {value:.4f}" for name, value in logs.items())
        print(f"epoch {epoch + 1}/{self.epochs} - {seconds:.1f} s - {shown}", flush=True)
        if self.checkpoints is None:
            return
        if self.runtime.chief:
            checkpoints.save(self.checkpoints, self.model, self.progress)
        else:  # saving is collective across workers; only the chief's copy is kept
            save_model(self.model, self.checkpoints.folder / "model.keras", self.runtime)


def save_model(model: keras.Model, path: Path, runtime: Runtime) -> None:
    """Write the model whole or not at all; only the chief's copy is kept.

    Across workers saving reads variables collectively, so every worker must save:
    the others write into a temporary folder that is deleted at once.
    """
    if runtime.chief:
        with atomic_output(path) as temporary:
            model.save(temporary)
        return
    with tempfile.TemporaryDirectory() as folder:
        model.save(Path(folder) / path.name)


def load_model(path: Path, made_by: str) -> keras.Model:
    """A model a stage wrote; a missing or unreadable file is one line naming it and the stage to rerun."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the {made_by} stage (dvc repro)")
    # Keras calls a file that is no zip archive "not found"; say what is really wrong.
    reason = None if zipfile.is_zipfile(path) else "not a zip archive, as a .keras file is"
    if reason is None:
        try:
            return keras.models.load_model(path)
        except Exception as error:  # Keras raises ValueError, OSError, KeyError... for a damaged file
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise PipelineError(f"{path} is not a readable Keras model ({reason}); rerun the {made_by} stage")


def fit(model: keras.Model, epoch_data: Callable[[int], tf.data.Dataset], val_data: tf.data.Dataset, epochs: int,
        progress: Progress, images_per_epoch: int, runtime: Runtime, checkpoints: Checkpoints | None = None,
        ) -> Progress:
    """Train until `epochs` in total, continuing after progress.epochs_done; only the chief keeps checkpoints.

    `epoch_data(e)` is epoch e's training data, batched at the global batch size (Keras splits every
    batch across the replicas). One fit() call per epoch, so that each epoch reads its own data,
    whatever epoch a resumed run starts from.
    """
    if progress.epochs_done >= epochs:
        return progress
    recorder = EpochRecorder(progress, epochs, images_per_epoch, checkpoints, runtime)
    with runtime.strategy.scope():
        if runtime.replicas > 1:
            _let_keras_fit_across_replicas(model, epoch_data(0).element_spec, runtime.workers)
        for epoch in range(progress.epochs_done, epochs):
            model.fit(by_batch(epoch_data(epoch)), validation_data=by_batch(val_data), initial_epoch=epoch,
                      epochs=epoch + 1, callbacks=[recorder], verbose=0,
                      shuffle=False)  # datasets shuffle themselves
    return progress


def _let_keras_fit_across_replicas(model: keras.Model, batch_spec: tuple, workers: int) -> None:
    """Work around Keras 3's fit() under tf.distribute (keras-team/keras#19246, #20585).

    fit() builds the model from the mean of the first batch over the replicas: that
    fails when the batch does not split evenly (a small validation set) and, across
    workers, always. So the model, its metrics and optimizer are built here from the
    batch's shape, as fit() itself does it, and fit() is told that the model has no
    strategy of its own: it then uses the enclosing scope's and skips that step.
    Across workers, fit() also reduces the scalar logs along an axis they do not
    have, so they get one.

    Private Keras API (`_symbolic_build`, `_distribute_strategy`): keras is pinned to 3.15.x in
    pyproject.toml for it. On an upgrade, check whether those issues are fixed (then delete this
    function) or whether the two attributes still exist and mean the same, by running
    tests/test_distribute.py, whose MirroredStrategy and multi-worker tests go through here.
    """
    model._symbolic_build(data_batch=batch_spec)
    model._distribute_strategy = None
    if workers > 1:
        def with_axis(step):
            return lambda data: {name: tf.reshape(value, [1]) for name, value in step(data).items()}

        model.train_step = with_axis(model.train_step)
        model.test_step = with_axis(model.test_step)


def by_batch(data: tf.data.Dataset) -> tf.data.Dataset:
    """Workers split the data batch by batch, never shard file by file.

    Every worker then reads all shards and keeps its part of each batch, so all
    take the same number of steps (shards differ in size) and the cardinality
    the readers assert stays true.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.with_options(options)


def infer(model: keras.Model, datasets: dict) -> dict[str, tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Run `model` in inference mode over each dataset of (inputs, labels): {name: (its outputs, labels)}.

    One traced function serves every dataset: each trace of a large network costs seconds.
    """
    step = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)
    results = {}
    for name, data in datasets.items():
        outputs, labels = [], []
        for inputs, batch_labels in data:
            result = step(inputs)
            # Copies: .numpy() shares TensorFlow's output buffer, and holding on to those buffers
            # halved the throughput of InceptionV3 here.
            outputs.append([part.numpy().copy() for part in tf.nest.flatten(result)])
            labels.append(batch_labels.numpy())
        results[name] = tuple(np.concatenate(parts) for parts in zip(*outputs)), np.concatenate(labels)
    return results


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
    for name, ((probabilities,), labels) in infer(model, splits).items():
        probabilities = probabilities.astype(np.float64)
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
                    "jit_compile": runtime.jit_compile, "distribute": runtime.distribute,
                    "replicas": runtime.replicas, "workers": runtime.workers},
    }

