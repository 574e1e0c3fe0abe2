"""Compiling and fitting a classifier one epoch at a time: what every training stage runs, logged by one callback.

`fit` calls Keras' fit() once per epoch, so each epoch reads its own data whatever epoch a resumed run
starts from; `EpochRecorder` records, prints, publishes and checkpoints each epoch, and keeps the best one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import keras
import tensorflow as tf
from tqdm import tqdm

from transfer import checkpoints
from transfer.checkpoints import Checkpoints, Progress
from transfer.config import Keep, Training
from transfer.errors import raise_if_interrupted
from transfer.keras_workarounds import let_keras_fit_across_replicas
from transfer.models import save_model
from transfer.outputs import write_json
from transfer.paths import history_file, metrics_file
from transfer.reports import write_history
from transfer.runtime import Runtime, by_batch


def new_optimizer(name: str, learning_rate: float, momentum: float | None = None) -> keras.optimizers.Optimizer:
    """A strategy's optimizer (config.OPTIMIZERS): RMSprop, or SGD with `momentum` (the Keras fine-tuning recipe's
    second phase: SGD at 1e-4, momentum 0.9)."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum or 0.0)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    raise ValueError(f"optimizer: {name!r} is not one of rmsprop, sgd")


def compile_model(model: keras.Model, learning_rate: float, training: Training, runtime: Runtime,
                  optimizer: keras.optimizers.Optimizer | str | None = None, momentum: float | None = None) -> None:
    """(Re)compile in the strategy's scope; needed after every change of `trainable`. `optimizer`: a resumed
    one, or the name of a new one (new_optimizer; None: RMSprop) at `learning_rate`, built in that scope too
    (an optimizer's variables are the strategy's: built outside it, a mirrored run refuses them).

    The learning rate is used as given whatever the number of replicas (see docs/scaling-out.md).
    """
    with runtime.distribution.scope():
        if optimizer is None or isinstance(optimizer, str):
            optimizer = new_optimizer(optimizer or "rmsprop", learning_rate, momentum)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
            # Keras 3 cannot run several steps per execution over several replicas (keras-team/keras#19246).
            steps_per_execution=training.steps_per_execution if runtime.replicas == 1 else 1,
            jit_compile=runtime.jit_compile,
        )


class EpochRecorder(keras.callbacks.Callback):
    """Record each epoch in `progress` and print it (under a progress bar on a terminal); keep the best epoch's
    weights (in progress.best, of `whole`: the whole classifier when fit() trains its suffix) when
    training.keep=best; publish the latest epoch of stage `live` in its metrics file (which
    `dvc exp show` reads while the experiment runs) and its curve so far in its history CSV (which
    `dvc plots` reads); checkpoint model and progress when given checkpoints. `phase`: a warm-head run's
    phase (1: the head alone, 2: the strategy's layers), recorded in each epoch's history entry."""

    def __init__(self, progress: Progress, epochs: int, images_per_epoch: int, checkpoints: Checkpoints | None,
                 runtime: Runtime, keep: Keep = "last", live: str | None = None, phase: int | None = None,
                 whole: keras.Model | None = None):
        super().__init__()
        self.progress, self.epochs, self.images_per_epoch = progress, epochs, images_per_epoch
        self.checkpoints, self.runtime, self.keep, self.live = checkpoints, runtime, keep, live
        self.phase, self.whole = phase, whole

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()
        # disable=None: drawn only on a terminal, so logs (CI, dvc queue logs) keep one line per epoch.
        self.bar = tqdm(total=self.params.get("steps"), desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                        leave=False, disable=None)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Keras calls this once per steps_per_execution batches, with the last batch's index.
        self.bar.update(batch + 1 - self.bar.n)
        raise_if_interrupted()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.close()
        seconds = time.perf_counter() - self.started
        self.progress.seconds += seconds
        self.progress.images_seen += self.images_per_epoch
        logs = {name: float(value) for name, value in (logs or {}).items()}
        phase = {} if self.phase is None else {"phase": self.phase}
        self.progress.history.append({"epoch": epoch + 1, **phase, **logs})
        shown = " - ".join(f"{name} {value:.4f}" for name, value in logs.items())
        during = "" if self.phase is None else f" (phase {self.phase}: {'head' if self.phase == 1 else 'strategy'})"
        print(f"epoch {epoch + 1}/{self.epochs}{during} - {seconds:.1f} s - {shown}", flush=True)
        if self.keep == "best" and self.progress.kept_epoch("best") == epoch + 1:
            self.progress.best = (self.whole or self.model).get_weights()
        if self.live is not None:
            # Replaced by the stage's metrics when it ends; read_metrics refuses a file that is still live.
            write_json(metrics_file(self.live), {"live": {"epoch": epoch + 1, "epochs": self.epochs, **logs}})
            write_history(history_file(self.live), self.progress.history)  # the stage ends with the same file
        if self.checkpoints is not None:
            checkpoint(self.checkpoints, self.model, self.progress, self.runtime)
        raise_if_interrupted()  # after the checkpoint: the finished epoch is kept

    def restore_kept(self) -> None:
        """Leave the model with the weights of the epoch training.keep names."""
        if self.keep == "best" and self.progress.kept_epoch("best") < self.progress.epochs_done:
            (self.whole or self.model).set_weights(self.progress.best)


def checkpoint(saved: Checkpoints, model: keras.Model, progress: Progress, runtime: Runtime) -> None:
    """Checkpoint `model` (the whole classifier) and `progress`; only the chief's copy is kept."""
    if runtime.chief:
        checkpoints.save(saved, model, progress, progress.best)
    else:  # saving is collective across workers
        save_model(model, saved.folder / "model.keras", runtime)


def fit(model: keras.Model, epoch_data: Callable[[int], tf.data.Dataset], val_data: tf.data.Dataset, epochs: int,
        progress: Progress, images_per_epoch: int, runtime: Runtime, checkpoints: Checkpoints | None = None,
        keep: Keep = "last", live: str | None = None, phase: int | None = None, whole: keras.Model | None = None,
        restore: bool = True) -> Progress:
    """Train until `epochs` in total, continuing after progress.epochs_done; only the chief keeps checkpoints.
    The model (`whole`, when `model` is its trainable suffix) ends with the weights of the epoch `keep` names
    (training.keep: best or last) of all of progress.history, unless `restore` is False (a phase that another
    follows: the next starts from the last epoch).

    `epoch_data(e)` is epoch e's training data, batched at the global batch size (Keras splits every
    batch across the replicas). One fit() call per epoch, so that each epoch reads its own data,
    whatever epoch a resumed run starts from. `live`: the stage whose metrics and history show each epoch.
    """
    recorder = EpochRecorder(progress, epochs, images_per_epoch, checkpoints, runtime, keep, live, phase, whole)
    recorder.set_model(model)
    with runtime.distribution.scope():
        if runtime.replicas > 1 and progress.epochs_done < epochs:
            let_keras_fit_across_replicas(model, epoch_data(0).element_spec, runtime.workers)
        for epoch in range(progress.epochs_done, epochs):
            model.fit(by_batch(epoch_data(epoch)), validation_data=by_batch(val_data), initial_epoch=epoch,
                      epochs=epoch + 1, callbacks=[recorder], verbose=0,
                      shuffle=False)  # datasets shuffle themselves
        if restore:
            recorder.restore_kept()
    return progress
