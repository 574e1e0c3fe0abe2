"""Inference and the scores computed from it: accuracy, loss, per-class precision, recall and F1."""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

EVAL_BATCH = 256  # images per inference batch: no gradients, so larger than a training batch


def inference_step(model: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    """`model` in inference mode as one traced function: each trace of a large network costs seconds."""
    return tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)


def batches(data: tf.data.Dataset, doing: str) -> Iterable:
    """The batches of `data`, under a progress bar saying what is `doing` when the output is a terminal.

    disable=None: drawn only on a terminal; logs stay as they were.
    """
    count = int(data.cardinality())
    return tqdm(data, total=count if count >= 0 else None, desc=doing, unit="batch", leave=False, disable=None)


def infer(model: keras.Model, datasets: dict) -> dict[str, tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Run `model` in inference mode over each dataset of (inputs, labels): {name: (its outputs, labels)}."""
    step = inference_step(model)
    results = {}
    for name, data in datasets.items():
        outputs, labels = [], []
        for inputs, batch_labels in batches(data, f"evaluating {name}"):
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
