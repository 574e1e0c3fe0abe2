"""Stage 5: fine-tune the pretrained base on the target task with the chosen strategy.

A fresh head replaces the source head; `strategies[strategy]` says which base
layers train. The base runs in inference mode (BatchNorm keeps its statistics)
unless it starts from random weights. With finetune.cache_features the frozen
part of the network runs once over every split and only the trainable rest
trains on its output: the same model as the plain path, many times faster.
Training through the base checkpoints every epoch, like pretrain, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from transfer.config import Params, load_params
from transfer.errors import PipelineError, run_stage
from transfer.models import base_of, build_base, classifier, count_params, freeze, frozen_prefix
from transfer.outputs import atomic_output, remove, write_json
from transfer.paths import CHECKPOINTS, FINETUNED_MODEL, METRICS, PRETRAINED_MODEL, RECORDS
from transfer.records import Split, check_shards, dataset, labels_of, open_split
from transfer.training import (
    EVAL_BATCH,
    Progress,
    Runtime,
    compile_model,
    evaluate_splits,
    fingerprint,
    fit,
    metrics_report,
    resume,
    set_up,
    write_history,
    write_predictions,
)

SPLITS = ("train", "val", "test")
CHECKPOINT_FOLDER = CHECKPOINTS / "finetune"


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


def build_model(params: Params, pretrained: keras.Model, classes: int, image_size: int) -> keras.Model:
    """The target classifier: the pretrained (or a random) base, frozen per strategy, and a fresh head."""
    strategy = params.chosen_strategy()
    from_scratch = strategy.base_weights == "random"
    keras.utils.set_random_seed(params.seed)  # the same fresh head whatever ran before
    base = build_base(params.model.backbone, image_size, "none") if from_scratch else base_of(pretrained)
    model = classifier(base, params.model.backbone, classes, params.model.head_units, params.model.dropout,
                       base_training=None if from_scratch else False)
    freeze(base, strategy)
    return model


def cached_features(prefix: keras.Model, data) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Run the frozen prefix once: (its outputs, labels) for every image of `data`."""
    step = tf.function(lambda images: prefix(images, training=False))
    outputs, labels = [], []
    for images, batch_labels in data:
        result = step(images)
        outputs.append(tuple(np.asarray(r) for r in (result if isinstance(result, (list, tuple)) else [result])))
        labels.append(batch_labels.numpy())
    return tuple(np.concatenate(parts) for parts in zip(*outputs)), np.concatenate(labels)


def feature_bytes(prefix: keras.Model, images: int) -> int:
    outputs = prefix.outputs
    return images * 4 * sum(int(np.prod(tensor.shape[1:])) for tensor in outputs)


def train_and_evaluate(params: Params, model: keras.Model, splits: dict[str, Split], keep: np.ndarray | None,
                       runtime: Runtime, key: str) -> tuple[keras.Model, Progress, dict, np.ndarray, np.ndarray]:
    """Train and evaluate; returns the full model (a resumed one replaces `model`), progress and results."""
    settings = params.finetune_settings()
    train_images = int(keep.sum()) if keep is not None else splits["train"].count
    cut = frozen_prefix(model) if params.finetune.cache_features else None
    if cut is not None and feature_bytes(cut[0], sum(s.count for s in splits.values())) > _free_memory() / 2:
        print("finetune: the feature cache would not fit in half the free memory; training through the base")
        cut = None
    if cut is None:
        resumed, progress = resume(CHECKPOINT_FOLDER, key)
        model = resumed or model
        data = {name: dataset(split, EVAL_BATCH, keep=keep if name == "train" else None)
                for name, split in splits.items()}
        train_data = dataset(splits["train"], settings.batch_size, keep=keep,
                             shuffle_buffer=params.train.shuffle_buffer, seed=params.seed)
        trained, checkpoints = model, CHECKPOINT_FOLDER
    else:
        # No checkpoint: after the one pass that caches features, an epoch over them takes seconds,
        # and checkpointing the suffix (which shares layers with the full model) would cost more than
        # it saves. The folder still has to exist, as dvc.yaml lists it as an output.
        remove(CHECKPOINT_FOLDER)
        CHECKPOINT_FOLDER.mkdir(parents=True)
        progress, checkpoints = Progress(), None
        prefix, trained = cut
        print(f"finetune: caching the output of {len(prefix.layers)} frozen layers")
        features = {name: cached_features(prefix, dataset(split, EVAL_BATCH, keep=keep if name == "train" else None))
                    for name, split in splits.items()}
        data = {name: _in_memory(*pair).batch(EVAL_BATCH) for name, pair in features.items()}
        train_data = (_in_memory(*features["train"])
                      .shuffle(params.train.shuffle_buffer, seed=params.seed, reshuffle_each_iteration=True)
                      .batch(settings.batch_size).prefetch(tf.data.AUTOTUNE))
    compile_model(trained, settings.learning_rate, params.train, runtime,
                  optimizer=getattr(trained, "optimizer", None) if checkpoints else None)
    fit(trained, train_data, data["val"], settings.epochs, progress, train_images, checkpoints, key)
    evaluation, labels, predicted = evaluate_splits(trained, data, splits["train"].classes)
    return model, progress, evaluation, labels, predicted


def checkpoint_key(params: Params) -> str:
    """Everything a finetune checkpoint depends on: the stage's params, the records and the pretrained model."""
    return fingerprint("finetune", params.seed, params.strategy, params.chosen_strategy().model_dump(),
                       params.finetune_settings().model_dump(), params.finetune.model_dump(),
                       params.train.model_dump(), params.model.head_units, params.model.dropout,
                       params.data.target_labels_per_class, (RECORDS / "meta.json").read_text(),
                       hashlib.md5(PRETRAINED_MODEL.read_bytes()).hexdigest())


def _in_memory(features: tuple[np.ndarray, ...], labels: np.ndarray) -> tf.data.Dataset:
    inputs = features[0] if len(features) == 1 else features
    return tf.data.Dataset.from_tensor_slices((inputs, labels))


def _free_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    splits = {name: open_split(RECORDS, "target", name) for name in SPLITS}
    for split in splits.values():
        check_shards(split)
    if not PRETRAINED_MODEL.is_file():
        raise PipelineError(f"{PRETRAINED_MODEL} not found: run the pretrain stage (dvc repro)")
    runtime = set_up(params.train, params.seed)
    pretrained = keras.models.load_model(PRETRAINED_MODEL)
    train = splits["train"]
    model = build_model(params, pretrained, len(train.classes), train.image_size)
    trainable = count_params(model.trainable_weights)
    keep = labelled_subset(labels_of(train), params.data.target_labels_per_class, params.seed)

    model, progress, evaluation, labels, predicted = train_and_evaluate(params, model, splits, keep, runtime,
                                                                        checkpoint_key(params))

    with atomic_output(FINETUNED_MODEL) as path:
        model.save(path)
    write_history(METRICS / "finetune_history.csv", progress.history)
    write_predictions(METRICS / "finetune_predictions.csv", labels, predicted, train.classes)
    report = metrics_report(strategy=params.strategy, model=model, trainable_params=trainable,
                            evaluation=evaluation, progress=progress,
                            stage_seconds=time.perf_counter() - started, runtime=runtime)
    report["train_images"] = int(keep.sum()) if keep is not None else train.count
    write_json(METRICS / "finetune.json", report)
    print(f"finetune: strategy {params.strategy}, {trainable:,} trainable parameters, "
          f"target test accuracy {evaluation['test']['accuracy']:.4f} -> {FINETUNED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
