"""The one trainer: train a classifier on a task from a starting point, with a freezing rule.

pretrain, baseline and finetune are each one `Run` of `train_classifier`, as nanoGPT's
train.py is one script for every `init_from`:

    stage      task    init                                 freezing
    pretrain   source  model.weights (imagenet, none, a file)   pretrain's rule (default all: the whole network)
    baseline   target  random weights                       strategies.0
    finetune   target  models/pretrained.keras              strategies[strategy]

The trainer builds the classifier (a fresh head on the base), freezes it, caches the
frozen prefix's output on disk when it can (transfer/feature_cache.py: the same model as
training through it, many times faster), checkpoints every epoch when it trains through
the base, and evaluates.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from transfer import checkpoints, feature_cache
from transfer.checkpoints import Checkpoints, Progress, best_weights
from transfer.config import Optimisation, Params, Strategy, Training
from transfer.evaluation import EVAL_BATCH, evaluate_splits
from transfer.feature_cache import inference_batch, not_cached
from transfer.keras_workarounds import let_keras_fit_across_replicas
from transfer.models import (
    base_of,
    build_base,
    classifier,
    count_params,
    frozen_prefix,
    keep_batchnorm_statistics,
    load_model,
    save_model,
)
from transfer.outputs import write_json
from transfer.paths import PRETRAINED_MODEL, RECORDS, SPLITS, feature_cache_folder, history_file, metrics_file
from transfer.records import Split, check_shards, dataset, epochs, labels_of, open_split
from transfer.reports import write_history
from transfer.runtime import Runtime, by_batch, global_batch
from transfer.strategies import freeze

PRETRAINED = "pretrained"  # Run.init: start from the pretrain stage's model


@dataclass(frozen=True)
class Run:
    """What a training stage asks of the trainer."""

    stage: str  # pretrain, baseline or finetune: its checkpoint folder and its identity in dvc.yaml
    init: str  # where the base starts: PRETRAINED, or a model.weights value (imagenet, none, a weights file)
    strategy: Strategy | None  # which base layers train; None: the whole network (pretraining)
    settings: Optimisation  # epochs, batch size, learning rate
    seed: int  # the fresh head, the labelled subset and every epoch's data order
    labels_per_class: int | None = None  # train on a class-balanced subset of the training split
    cache_features: bool = False  # run the frozen prefix once and train the rest on its output
    checkpoints: bool = True  # resume an interrupted run and checkpoint every epoch (benchmarks turn it off)


@dataclass
class Result:
    """A trained classifier and what its training and evaluation measured."""

    model: keras.Model  # the whole classifier (a resumed one replaces the one built)
    trainable_params: int
    train_images: int
    progress: Progress
    classes: tuple[str, ...]
    evaluation: dict | None = None  # {split: scores}; None on workers other than the chief
    test_labels: np.ndarray | None = None
    test_predicted: np.ndarray | None = None
    keep: str = "last"  # training.keep: which epoch `model` is
    feature_cache: dict | None = None  # how the frozen prefix's output was cached (feature_cache.describe)

    @property
    def kept_epoch(self) -> int:
        return self.progress.kept_epoch(self.keep)


def train_classifier(run: Run, splits: dict[str, Split], params: Params, runtime: Runtime) -> Result:
    """Build, freeze, train on `splits` (see open_task), resuming an interrupted run of the same stage, and
    evaluate. The feature cache's folder is gone when this returns, or raises."""
    try:
        return _train_classifier(run, splits, params, runtime)
    finally:
        shutil.rmtree(feature_cache_folder(run.stage), ignore_errors=True)


def _train_classifier(run: Run, splits: dict[str, Split], params: Params, runtime: Runtime) -> Result:
    train = splits["train"]
    batch = global_batch(run.settings.batch_size, runtime)
    resumable = checkpoints.for_stage(run.stage, batch) if run.checkpoints else None
    with runtime.distribution.scope():
        model = build_classifier(run, params, len(train.classes), train.image_size)
    trainable = count_params(model.trainable_weights)
    keep = None if run.labels_per_class is None else labelled_subset(labels_of(train), run.labels_per_class,
                                                                       run.seed)
    train_images = int(keep.sum()) if keep is not None else train.count
    shuffle = {"shuffle_buffer": params.training.shuffle_buffer, "seed": run.seed}
    cut = frozen_prefix(model) if run.cache_features else None
    counts = {name: train_images if name == "train" else split.count for name, split in splits.items()}
    scratch = feature_cache_folder(run.stage)
    shutil.rmtree(scratch, ignore_errors=True)  # a hard-killed run's (no `finally` runs after kill -9)
    cache, cache_report = None, not_cached(None if run.cache_features else "cache_features is off")
    if run.cache_features and cut is None:
        cache_report = not_cached("the whole base trains: nothing is frozen to cache")
    elif cut is not None:
        # No checkpoint on this path: after the one pass that caches features, an epoch over them takes
        # seconds, and checkpointing the suffix (which shares layers with the full model) would cost more
        # than it saves.
        prefix, trained = cut
        print(f"{run.stage}: caching the frozen prefix's {len(prefix.outputs)} output(s) for {sum(counts.values())} "
              f"images in {scratch} ({feature_cache.storage_bytes(prefix, sum(counts.values())) / 2**20:.0f} MiB)")
        try:
            cache = feature_cache.build(prefix, {name: dataset(split, inference_batch(train.image_size),
                                                               keep=keep if name == "train" else None)
                                                 for name, split in splits.items()},
                                        counts, scratch, bfloat16=runtime.frozen_pass_bfloat16)
        except feature_cache.NoRoom as no_room:
            print(f"{run.stage}: {no_room}; training through the base instead (about 10x slower)")
            cache_report = not_cached(str(no_room))
    if cache is None:
        progress = Progress()
        if resumable is not None:
            with runtime.distribution.scope():
                resumed, progress = checkpoints.resume(resumable, runtime.workers, runtime.chief)
            if resumed is not None and keeps_statistics(run):  # a .keras file holds plain BatchNorm layers
                keep_batchnorm_statistics(base_of(resumed))
            model = resumed or model
        data = {name: dataset(split, EVAL_BATCH, keep=keep if name == "train" else None)
                for name, split in splits.items()}
        train_epochs = epochs(train, batch, keep=keep, **shuffle)
        trained = model
    else:
        progress, resumable = Progress(), None
        cache_report = cache.describe()
        print(f"{run.stage}: cached {cache_report['mib']} MiB of {cache_report['dtype']} features "
              f"(computed in {cache_report['computed_in']}) in {cache_report['seconds']} s")
        data = {name: cache.dataset(name, EVAL_BATCH) for name in splits}
        train_epochs = cache.epochs(batch, shuffle["shuffle_buffer"], shuffle["seed"])
    compile_model(trained, run.settings.learning_rate, params.training, runtime,
                  optimizer=getattr(trained, "optimizer", None) if resumable else None)
    fit(trained, train_epochs, data["val"], run.settings.epochs, progress, train_images, runtime, resumable,
        keep=params.training.keep, live=run.stage if runtime.chief else None)
    result = Result(model, trainable, train_images, progress, train.classes, keep=params.training.keep,
                    feature_cache=cache_report)
    if runtime.chief:  # inference is no collective: the other workers need not repeat it
        result.evaluation, result.test_labels, result.test_predicted = evaluate_splits(trained, data, train.classes)
    return result


def build_classifier(run: Run, params: Params, classes: int, image_size: int) -> keras.Model:
    """A fresh head on the run's base, frozen as its strategy says. Call it in the distribution's scope."""
    pretrained = load_model(PRETRAINED_MODEL, made_by="pretrain") if run.init == PRETRAINED else None
    keras.utils.set_random_seed(run.seed)  # the same fresh head whatever ran before
    backbone = params.model.backbone
    base = base_of(pretrained) if pretrained is not None else build_base(backbone, image_size, run.init)
    model = classifier(base, backbone, classes, params.model.head_units, params.model.dropout,
                       base_training=False if keeps_statistics(run) else None)
    if run.strategy is not None:
        freeze(base, run.strategy, backbone)
    return model


def keeps_statistics(run: Run) -> bool:
    """Whether the run's base keeps its BatchNorm statistics (inference mode) whatever trains.

    A base that starts from learnt weights does, as the Keras transfer-learning recipe says: the pretrained base
    of finetune, and one that pretrain partly freezes (ImageNet or a weights file). One that starts from random
    weights learns them (the baseline), and so does pretrain when it trains the whole network (the default): it
    adapts the whole ImageNet network, statistics included, to the source task, as the pipeline always has.
    """
    return run.init == PRETRAINED or (run.init != "none" and run.strategy is not None)


def open_task(task: str) -> dict[str, Split]:
    """The task's splits, every shard read once so a damaged one is named before any work."""
    splits = {name: open_split(RECORDS, task, name) for name in SPLITS}
    for split in splits.values():
        check_shards(split)
    return splits


def labelled_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray | None:
    """A seeded, class-balanced boolean mask over the split's indices (None = every image)."""
    if per_class is None:
        return None
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep[rng.permutation(members)[:per_class]] = True
    return keep


def compile_model(model: keras.Model, learning_rate: float, training: Training, runtime: Runtime,
                  optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """(Re)compile in the strategy's scope; needed after every change of `trainable`.

    The learning rate is used as given whatever the number of replicas (see docs/scaling-out.md).
    """
    with runtime.distribution.scope():
        model.compile(
            optimizer=optimizer or keras.optimizers.RMSprop(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
            # Keras 3 cannot run several steps per execution over several replicas (keras-team/keras#19246).
            steps_per_execution=training.steps_per_execution if runtime.replicas == 1 else 1,
            jit_compile=runtime.jit_compile,
        )


class EpochRecorder(keras.callbacks.Callback):
    """Record each epoch in `progress` and print it (under a progress bar on a terminal); keep the best epoch's
    weights when training.keep=best; publish the latest epoch of stage `live` in its metrics file (which
    `dvc exp show` reads while the experiment runs) and its curve so far in its history CSV (which
    `dvc plots` reads); checkpoint model and progress when given checkpoints."""

    def __init__(self, progress: Progress, epochs: int, images_per_epoch: int, checkpoints: Checkpoints | None,
                 runtime: Runtime, keep: str = "last", live: str | None = None):
        super().__init__()
        self.progress, self.epochs, self.images_per_epoch = progress, epochs, images_per_epoch
        self.checkpoints, self.runtime, self.keep, self.live = checkpoints, runtime, keep, live
        # A resumed run continues with the best weights its checkpoint kept.
        resumed = keep == "best" and checkpoints is not None and progress.epochs_done > 0
        self.best_weights = best_weights(checkpoints) if resumed else None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()
        # disable=None: drawn only on a terminal, so logs (CI, dvc queue logs) keep one line per epoch.
        self.bar = tqdm(total=self.params.get("steps"), desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                        leave=False, disable=None)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Keras calls this once per steps_per_execution batches, with the last batch's index.
        self.bar.update(batch + 1 - self.bar.n)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.close()
        seconds = time.perf_counter() - self.started
        self.progress.seconds += seconds
        self.progress.images_seen += self.images_per_epoch
        logs = {name: float(value) for name, value in (logs or {}).items()}
        self.progress.history.append({"epoch": epoch + 1, **logs})
        shown = " - ".join(f"{name} {value:.4f}" for name, value in logs.items())
        print(f"epoch {epoch + 1}/{self.epochs} - {seconds:.1f} s - {shown}", flush=True)
        if self.keep == "best" and self.progress.kept_epoch("best") == epoch + 1:
            self.best_weights = self.model.get_weights()
        if self.live is not None:
            # Replaced by the stage's metrics when it ends; read_metrics refuses a file that is still live.
            write_json(metrics_file(self.live), {"live": {"epoch": epoch + 1, "epochs": self.epochs, **logs}})
            write_history(history_file(self.live), self.progress.history)  # the stage ends with the same file
        if self.checkpoints is None:
            return
        if self.runtime.chief:
            checkpoints.save(self.checkpoints, self.model, self.progress, self.best_weights)
        else:  # saving is collective across workers; only the chief's copy is kept
            save_model(self.model, self.checkpoints.folder / "model.keras", self.runtime)

    def restore_kept(self) -> None:
        """Leave the model with the weights of the epoch training.keep names."""
        if self.keep == "best" and self.progress.kept_epoch("best") < self.progress.epochs_done:
            self.model.set_weights(self.best_weights)


def fit(model: keras.Model, epoch_data: Callable[[int], tf.data.Dataset], val_data: tf.data.Dataset, epochs: int,
        progress: Progress, images_per_epoch: int, runtime: Runtime, checkpoints: Checkpoints | None = None,
        keep: str = "last", live: str | None = None) -> Progress:
    """Train until `epochs` in total, continuing after progress.epochs_done; only the chief keeps checkpoints.
    The model ends with the weights of the epoch `keep` names (training.keep: best or last).

    `epoch_data(e)` is epoch e's training data, batched at the global batch size (Keras splits every
    batch across the replicas). One fit() call per epoch, so that each epoch reads its own data,
    whatever epoch a resumed run starts from. `live`: the stage whose metrics and history show each epoch.
    """
    recorder = EpochRecorder(progress, epochs, images_per_epoch, checkpoints, runtime, keep, live)
    recorder.set_model(model)
    with runtime.distribution.scope():
        if runtime.replicas > 1 and progress.epochs_done < epochs:
            let_keras_fit_across_replicas(model, epoch_data(0).element_spec, runtime.workers)
        for epoch in range(progress.epochs_done, epochs):
            model.fit(by_batch(epoch_data(epoch)), validation_data=by_batch(val_data), initial_epoch=epoch,
                      epochs=epoch + 1, callbacks=[recorder], verbose=0,
                      shuffle=False)  # datasets shuffle themselves
        recorder.restore_kept()
    return progress
