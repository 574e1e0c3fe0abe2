"""The one trainer: train a classifier on a task from a starting point, with a freezing rule.

pretrain, baseline and finetune are each one `Run` of `train_classifier` (transfer/training_stage.py's
`run_for` makes it from the params), as nanoGPT's train.py is one script for every `init_from`.

The trainer builds the classifier (a fresh head on the base) and freezes it, then trains it in one phase, or
two when the strategy warms its head (head_epochs): the head alone first, then the strategy's layers with their
own learning rate and optimizer, as the Keras fine-tuning recipe does, so that a random head's large early
gradients do not flow into the pretrained layers (Kumar et al., ICLR 2022, "LP-FT"). Each phase trains one of
two ways: on the frozen prefix's output, computed once and cached on disk (transfer/feature_cache.py: the same
model, many times faster, as the keras.io transfer-learning guide's "run the base once" suggests), or through the
base, checkpointing every epoch; a warm head is also checkpointed at its end. One history (its rows name their
phase), one kept epoch over both phases, evaluated.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from transfer import checkpoints, feature_cache
from transfer.checkpoints import Checkpoints, Progress
from transfer.config import Keep, Optimisation, Params, Strategy
from transfer.evaluation import EVAL_BATCH, evaluate_splits
from transfer.feature_cache import inference_batch
from transfer.fitting import checkpoint, compile_model, fit
from transfer.keras_workarounds import keep_batchnorm_statistics
from transfer.models import base_of, build_base, classifier, count_params, load_model
from transfer.paths import PRETRAINED_MODEL, RECORDS, SPLITS, feature_cache_folder
from transfer.records import Split, check_shards, dataset, epochs, labels_of, open_split
from transfer.runtime import Runtime, global_batch
from transfer.strategies import Phase, freeze, phases

PRETRAINED = "pretrained"  # Run.init: start from the pretrain stage's model
# Where a run's base starts: the pretrain stage's model, ImageNet's weights, random weights, or a weights file.
Init = Literal["pretrained", "imagenet", "none"] | Path
TrainingStage = Literal["pretrain", "baseline", "finetune"]


@dataclass(frozen=True)
class Run:
    """What a training stage asks of the trainer."""

    stage: TrainingStage  # its checkpoint folder and its identity in dvc.yaml
    init: Init
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
    keep: Keep = "last"  # training.keep: which epoch `model` is
    feature_cache: dict | None = None  # how the frozen prefix's output was cached (feature_cache.describe)

    @property
    def kept_epoch(self) -> int:
        return self.progress.kept_epoch(self.keep)


@dataclass
class _Fitted:
    """What either way of training gives: the classifier, what fit() trained and the data to evaluate it on."""

    model: keras.Model  # the whole classifier (a resumed one replaces the one built)
    trained: keras.Model  # the classifier, or its trainable suffix when it trained on cached features
    data: dict[str, tf.data.Dataset]  # every split as `trained` reads it: images, or cached features
    progress: Progress
    feature_cache: dict  # how the frozen prefix's output was cached (feature_cache.describe), or why not


def train_classifier(run: Run, splits: dict[str, Split], params: Params, runtime: Runtime) -> Result:
    """Build, freeze, train on `splits` (see open_task) phase by phase, resuming an interrupted run of the same
    stage, and evaluate. The feature cache's folder is gone when this returns, or raises."""
    scratch = feature_cache_folder(run.stage)
    train = splits["train"]
    try:
        batch = global_batch(run.settings.batch_size, runtime)
        resumable = checkpoints.for_stage(run.stage, batch) if run.checkpoints else None
        with runtime.distribution.scope():
            model = build_classifier(run, params, len(train.classes), train.image_size)
        trainable = count_params(model.trainable_weights)  # the strategy's, whatever a warm head trains first
        keep = None if run.labels_per_class is None else labelled_subset(labels_of(train), run.labels_per_class,
                                                                           run.seed)
        counts = {name: split.count if name != "train" or keep is None else int(keep.sum())
                  for name, split in splits.items()}
        steps = phases(run.strategy, run.settings, params.finetune.learning_rate, params.model.backbone)
        progress = None  # a run without a warm head resumes where it trains through the base, as it always has
        if len(steps) > 1:  # a warm head is checkpointed at the end of phase 1 whichever way it trains
            model, progress = _resume(run, model, resumable, runtime)
        for phase in steps:
            if phase is not steps[-1] and progress.epochs_done >= phase.until:
                continue  # resumed after it (the last phase runs even so: it leaves the kept epoch's weights)
            fitted = _train_phase(run, phase, model, splits, keep, counts, batch, params, runtime, resumable,
                                  progress, last=phase is steps[-1])
            model, progress = fitted.model, fitted.progress
            if phase is not steps[-1] and resumable is not None and fitted.trained is not model:
                checkpoint(resumable, model, progress, runtime)  # on features: no epoch of it was checkpointed
        result = Result(fitted.model, trainable, counts["train"], fitted.progress, train.classes,
                        keep=params.training.keep, feature_cache=fitted.feature_cache)
        if runtime.chief:  # inference is no collective: the other workers need not repeat it
            result.evaluation, result.test_labels, result.test_predicted = evaluate_splits(
                fitted.trained, fitted.data, train.classes)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _resume(run: Run, model: keras.Model, resumable: Checkpoints | None,
            runtime: Runtime) -> tuple[keras.Model, Progress]:
    """The stage's checkpoint if it is this run's (checkpoints.resume), else `model` and no progress."""
    if resumable is None:
        return model, Progress()
    with runtime.distribution.scope():
        resumed, progress = checkpoints.resume(resumable, runtime.workers, runtime.chief)
    if resumed is None:
        return model, progress
    if keeps_statistics(run):  # a .keras file holds plain BatchNorm layers
        keep_batchnorm_statistics(base_of(resumed))
    return resumed, progress


def _train_phase(run: Run, phase: Phase, model: keras.Model, splits: dict[str, Split], keep: np.ndarray | None,
                 counts: dict[str, int], batch: int, params: Params, runtime: Runtime,
                 resumable: Checkpoints | None, progress: Progress | None, last: bool) -> _Fitted:
    """Train one phase on cached features where its freezing rule leaves a frozen prefix, else through the base."""
    if phase.rule is not None:
        freeze(base_of(model), phase.rule, params.model.backbone)
    cut, report = feature_cache.plan(model, run.cache_features, sum(counts.values()), feature_cache_folder(run.stage),
                                     run.stage)
    if cut is not None:
        try:
            return _on_features(run, phase, model, cut, splits, keep, counts, batch, params, runtime,
                                progress or Progress(), last)
        except feature_cache.NoRoom as no_room:  # float16 did not fit the features, and float32 needs twice
            print(f"{run.stage}: {no_room}; training through the base instead ({feature_cache.SLOWER})")
            report = feature_cache.not_cached(str(no_room))
    fitted = _through_base(run, phase, model, splits, keep, counts, batch, params, runtime, resumable, progress,
                           last)
    fitted.feature_cache = report
    return fitted


def _through_base(run: Run, phase: Phase, model: keras.Model, splits: dict[str, Split], keep: np.ndarray | None,
                  counts: dict[str, int], batch: int, params: Params, runtime: Runtime,
                  resumable: Checkpoints | None, progress: Progress | None, last: bool) -> _Fitted:
    """Train the whole classifier on the images, checkpointing every epoch; without `progress` (a run without a
    warm head) resume the stage's checkpoint first."""
    if progress is None:
        model, progress = _resume(run, model, resumable, runtime)
    data = {name: dataset(split, EVAL_BATCH, keep=keep if name == "train" else None) for name, split in splits.items()}
    train = epochs(splits["train"], batch, keep=keep, shuffle_buffer=params.training.shuffle_buffer, seed=run.seed)
    # A resumed run continues with its checkpoint's optimizer state, unless it resumed at the start of a phase.
    starts = phase.number is not None and progress.epochs_done == phase.start
    resumed = getattr(model, "optimizer", None) if resumable and not starts else None
    compile_model(model, phase.learning_rate, params.training, runtime, optimizer=resumed or phase.optimizer,
                  momentum=phase.momentum)
    fit(model, train, data["val"], phase.until, progress, counts["train"], runtime, resumable,
        keep=params.training.keep, live=run.stage if runtime.chief else None, phase=phase.number, restore=last)
    return _Fitted(model, model, data, progress, None)


def _on_features(run: Run, phase: Phase, model: keras.Model, cut: tuple[keras.Model, keras.Model],
                 splits: dict[str, Split], keep: np.ndarray | None, counts: dict[str, int], batch: int,
                 params: Params, runtime: Runtime, progress: Progress, last: bool) -> _Fitted:
    """Run the frozen prefix once over every split, then train the suffix on its cached output. No checkpoint:
    after that pass an epoch takes seconds, and checkpointing the suffix (which shares layers with the whole
    model) would cost more than it saves. Raises feature_cache.NoRoom before training if the disk is short."""
    prefix, suffix = cut
    scratch = feature_cache_folder(run.stage)
    print(f"{run.stage}: caching the frozen prefix's {len(prefix.outputs)} output(s) for {sum(counts.values())} "
          f"images in {scratch} ({feature_cache.storage_bytes(prefix, sum(counts.values())) / 2**20:.0f} MiB)")
    image_batch = inference_batch(splits["train"].image_size)
    cache = feature_cache.build(prefix, {name: dataset(split, image_batch, keep=keep if name == "train" else None)
                                         for name, split in splits.items()},
                                counts, scratch, bfloat16=runtime.frozen_pass_bfloat16)
    report = cache.describe()
    print(f"{run.stage}: cached {report['mib']} MiB of {report['dtype']} features "
          f"(computed in {report['computed_in']}) in {report['seconds']} s")
    data = {name: cache.dataset(name, EVAL_BATCH) for name in splits}
    train = cache.epochs(batch, params.training.shuffle_buffer, run.seed)
    compile_model(suffix, phase.learning_rate, params.training, runtime, optimizer=phase.optimizer,
                  momentum=phase.momentum)
    fit(suffix, train, data["val"], phase.until, progress, counts["train"], runtime,
        keep=params.training.keep, live=run.stage if runtime.chief else None, phase=phase.number, whole=model,
        restore=last)
    return _Fitted(model, suffix, data, progress, report)


def build_classifier(run: Run, params: Params, classes: int, image_size: int) -> keras.Model:
    """A fresh head on the run's base, frozen as its strategy says. Call it in the distribution's scope."""
    pretrained = load_model(PRETRAINED_MODEL, made_by="pretrain") if run.init == PRETRAINED else None
    keras.utils.set_random_seed(run.seed)  # the same fresh head whatever ran before
    backbone = params.model.backbone
    base = base_of(pretrained) if pretrained is not None else build_base(backbone, image_size, str(run.init))
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
