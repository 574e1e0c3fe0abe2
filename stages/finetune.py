"""Stage 5: fine-tune the pretrained base on the target task with the chosen strategy.

A fresh head replaces the source head; `strategies[strategy]` says which base
layers train. The base runs in inference mode (BatchNorm keeps its statistics)
unless it starts from random weights. With finetune.cache_features the frozen
part of the network runs once over every split and only the trainable rest
trains on its output: the same model as the plain path, many times faster.
finetune.json reports `gain_over_scratch`: test accuracy minus the baseline
stage's (the same network trained on the target task from random weights).
Training through the base checkpoints every epoch, like pretrain, so an
interrupted run continues where it stopped (transfer/checkpoints.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from transfer import checkpoints
from transfer.checkpoints import Checkpoints, Progress
from transfer.config import Params, load_params
from transfer.errors import PipelineError, run_stage
from transfer.models import base_of, build_base, classifier, count_params, freeze, frozen_prefix
from transfer.outputs import write_json
from transfer.paths import BASELINE_METRICS, FINETUNED_MODEL, METRICS, PRETRAINED_MODEL, RECORDS
from transfer.records import Split, check_shards, dataset, epoch_seed, epochs, labels_of, open_split
from transfer.training import (
    EVAL_BATCH,
    Runtime,
    compile_model,
    evaluate_splits,
    fit,
    global_batch,
    infer,
    load_model,
    metrics_report,
    save_model,
    set_up,
    write_history,
    write_predictions,
)

SPLITS = ("train", "val", "test")


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


def build_model(params: Params, pretrained: keras.Model | None, classes: int, image_size: int) -> keras.Model:
    """The target classifier: the pretrained (or a random) base, frozen per strategy, and a fresh head."""
    strategy = params.chosen_strategy()
    from_scratch = strategy.base_weights == "random"
    keras.utils.set_random_seed(params.finetune.seed)  # the same fresh head whatever ran before
    base = build_base(params.model.backbone, image_size, "none") if from_scratch else base_of(pretrained)
    model = classifier(base, params.model.backbone, classes, params.model.head_units, params.model.dropout,
                       base_training=None if from_scratch else False)
    freeze(base, strategy)
    return model


def feature_bytes(prefix: keras.Model, images: int) -> int:
    outputs = prefix.outputs
    return images * 4 * sum(int(np.prod(tensor.shape[1:])) for tensor in outputs)


def train_and_evaluate(params: Params, model: keras.Model, splits: dict[str, Split], keep: np.ndarray | None,
                       runtime: Runtime, resumable: Checkpoints | None,
                       ) -> tuple[keras.Model, Progress, dict, np.ndarray, np.ndarray]:
    """Train and evaluate; returns the full model (a resumed one replaces `model`), progress and results."""
    settings = params.finetune_settings()
    batch = global_batch(settings.batch_size, runtime)
    shuffle = {"shuffle_buffer": params.train.shuffle_buffer, "seed": params.finetune.seed}
    train_images = int(keep.sum()) if keep is not None else splits["train"].count
    cut = frozen_prefix(model) if params.finetune.cache_features else None
    if cut is not None and feature_bytes(cut[0], sum(s.count for s in splits.values())) > _free_memory() / 2:
        print("finetune: the feature cache would not fit in half the free memory; training through the base")
        cut = None
    if cut is None:
        progress = Progress()
        if resumable is not None:
            with runtime.strategy.scope():
                resumed, progress = checkpoints.resume(resumable, runtime.workers, runtime.chief)
            model = resumed or model
        data = {name: dataset(split, EVAL_BATCH, keep=keep if name == "train" else None)
                for name, split in splits.items()}
        train_epochs = epochs(splits["train"], batch, keep=keep, **shuffle)
        trained = model
    else:
        # No checkpoint: after the one pass that caches features, an epoch over them takes seconds,
        # and checkpointing the suffix (which shares layers with the full model) would cost more than
        # it saves.
        progress, resumable = Progress(), None
        prefix, trained = cut
        print(f"finetune: caching the output of {len(prefix.layers)} frozen layers")
        features = infer(prefix, {name: dataset(split, EVAL_BATCH, keep=keep if name == "train" else None)
                                  for name, split in splits.items()})
        data = {name: _in_memory(*pair).batch(EVAL_BATCH) for name, pair in features.items()}
        cached_train = _in_memory(*features["train"])

        def train_epochs(epoch: int) -> tf.data.Dataset:
            order = epoch_seed(shuffle["seed"], epoch)
            return (cached_train.shuffle(shuffle["shuffle_buffer"], seed=order, reshuffle_each_iteration=False)
                    .batch(batch).prefetch(tf.data.AUTOTUNE))
    compile_model(trained, settings.learning_rate, params.train, runtime,
                  optimizer=getattr(trained, "optimizer", None) if resumable else None)
    fit(trained, train_epochs, data["val"], settings.epochs, progress, train_images, runtime, resumable)
    evaluation, labels, predicted = evaluate_splits(trained, data, splits["train"].classes)
    return model, progress, evaluation, labels, predicted


def _in_memory(features: tuple[np.ndarray, ...], labels: np.ndarray) -> tf.data.Dataset:
    inputs = features[0] if len(features) == 1 else features
    return tf.data.Dataset.from_tensor_slices((inputs, labels))


def _free_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Outcome:
    """A fine-tuned model and what its training and evaluation measured."""

    model: keras.Model
    trainable: int
    train_images: int
    progress: Progress
    evaluation: dict
    labels: np.ndarray
    predicted: np.ndarray
    classes: tuple[str, ...]
    runtime: Runtime

    def report(self, strategy: int, stage_seconds: float) -> dict:
        report = metrics_report(strategy=strategy, model=self.model, trainable_params=self.trainable,
                                evaluation=self.evaluation, progress=self.progress,
                                stage_seconds=stage_seconds, runtime=self.runtime)
        report["train_images"] = self.train_images
        return report


def target_splits() -> dict[str, Split]:
    """The target task's splits, every shard read once so a damaged one is named before any work."""
    splits = {name: open_split(RECORDS, "target", name) for name in SPLITS}
    for split in splits.values():
        check_shards(split)
    return splits


def fine_tune(params: Params, splits: dict[str, Split], runtime: Runtime, resumable: Checkpoints | None) -> Outcome:
    """Train and evaluate `params.strategy` on the target task (shared by the finetune and baseline stages)."""
    from_scratch = params.chosen_strategy().base_weights == "random"
    train = splits["train"]
    with runtime.strategy.scope():
        pretrained = None if from_scratch else load_model(PRETRAINED_MODEL, made_by="pretrain")
        model = build_model(params, pretrained, len(train.classes), train.image_size)
    trainable = count_params(model.trainable_weights)
    keep = labelled_subset(labels_of(train), params.data.target_labels_per_class, params.finetune.seed)
    model, progress, evaluation, labels, predicted = train_and_evaluate(params, model, splits, keep, runtime,
                                                                        resumable)
    train_images = int(keep.sum()) if keep is not None else train.count
    return Outcome(model, trainable, train_images, progress, evaluation, labels, predicted, train.classes, runtime)


def read_baseline() -> dict:
    try:
        return json.loads(BASELINE_METRICS.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{BASELINE_METRICS} not found: run the baseline stage (dvc repro)") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{BASELINE_METRICS} is not valid JSON ({error}); rerun the baseline stage") from None


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    runtime = set_up(params.train, params.finetune.seed)  # first: a multi-worker strategy must exist before TF starts
    splits = target_splits()
    baseline = read_baseline()
    resumable = checkpoints.for_stage("finetune")
    outcome = fine_tune(params, splits, runtime, resumable)
    save_model(outcome.model, FINETUNED_MODEL, runtime)
    if not runtime.chief:
        print("finetune: training done; the chief writes the outputs")
        return
    write_history(METRICS / "finetune_history.csv", outcome.progress.history)
    write_predictions(METRICS / "finetune_predictions.csv", outcome.labels, outcome.predicted, outcome.classes)
    report = outcome.report(params.strategy, time.perf_counter() - started)
    # Test accuracy minus that of the same network trained from scratch: what transfer bought.
    gain = report["gain_over_scratch"] = round(report["test"]["accuracy"] - baseline["test"]["accuracy"], 6)
    write_json(METRICS / "finetune.json", report)
    checkpoints.finish(resumable)
    print(f"finetune: strategy {params.strategy}, {outcome.trainable:,} trainable parameters, "
          f"target test accuracy {report['test']['accuracy']:.4f} ({gain:+.4f} over scratch) -> {FINETUNED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
