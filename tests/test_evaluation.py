"""The numbers every training stage reports, computed by hand on small cases: accuracy, loss, per-class
precision/recall/F1 (transfer/evaluation.py), and the metrics JSON and CSVs (transfer/reports.py)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer.checkpoints import Progress
from transfer.evaluation import evaluate_splits, per_class, scores
from transfer.reports import write_history, write_predictions
from transfer.runtime import Runtime
from transfer.training import Result
from transfer.training_stage import metrics_report

NAMES = ("a", "b", "c", "d", "e")
# (actual, predicted): a is right 2 of 3 times and predicted 3 times; b right 1 of 3, predicted twice; c right
# 1 of 3, predicted 4 times; d predicted once but never occurs; e occurs once and is never predicted.
PAIRS = [(0, 0), (0, 0), (0, 3), (1, 1), (1, 2), (1, 2), (2, 1), (2, 2), (2, 0), (4, 2)]
LABELS, PREDICTED = np.array([actual for actual, _ in PAIRS]), np.array([predicted for _, predicted in PAIRS])


def test_accuracy_is_the_share_of_argmax_hits_and_loss_the_mean_negative_log_of_the_true_class():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.0, 1.0, 0.0]])
    labels = np.array([0, 2, 0, 0])
    result = scores(labels, probabilities)
    assert result["accuracy"] == 0.75
    # The true class's probability 0 counts as 1e-7, not as an infinite loss.
    assert result["loss"] == pytest.approx((-math.log(0.7) - math.log(0.6) - math.log(0.5) - math.log(1e-7)) / 4)


def test_per_class_precision_is_over_predictions_and_recall_over_actual_images():
    report = per_class(LABELS, PREDICTED, NAMES)
    assert report["per_class"] == {
        "a": {"precision": 0.666667, "recall": 0.666667, "f1": 0.666667},
        "b": {"precision": 0.5, "recall": 0.333333, "f1": 0.4},  # F1 = 2pr / (p + r), also when p + r < 1
        "c": {"precision": 0.25, "recall": 0.333333, "f1": 0.285714},
        "d": {"precision": 0.0, "recall": 0.0, "f1": 0.0},  # predicted, never right; no image: no division by 0
        "e": {"precision": 0.0, "recall": 0.0, "f1": 0.0},  # never predicted: no division by zero
    }
    assert report["per_class_accuracy"] == {"a": 0.666667, "b": 0.333333, "c": 0.333333, "d": 0.0, "e": 0.0}
    assert report["macro_f1"] == round((2 / 3 + 0.4 + 2 / 7) / 5, 6)
    assert list(report["per_class"]) == list(NAMES) == list(report["per_class_accuracy"])


def test_evaluate_splits_scores_every_split_from_the_models_predictions():
    inputs = keras.Input((2,))
    dropped = keras.layers.Dropout(0.5)(inputs)  # inference mode: dropout must not change what is scored
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(dropped))
    model.set_weights([np.array([[2.0, -1.0, 0.0], [0.0, 1.0, -2.0]]), np.array([0.0, 0.5, 0.0])])
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=10)
    probabilities = model.predict(features, verbose=0).astype(np.float64)
    data = {"train": tf.data.Dataset.from_tensor_slices((features, labels)).batch(4),
            "test": tf.data.Dataset.from_tensor_slices((features[:7], labels[:7])).batch(3)}
    results, test_labels, test_predicted = evaluate_splits(model, data, ("x", "y", "z"))
    assert results["train"] == {key: round(value, 6) for key, value in scores(labels, probabilities).items()}
    assert results["test"] == {**{key: round(value, 6) for key, value in scores(labels[:7], probabilities[:7]).items()},
                               **per_class(labels[:7], probabilities[:7].argmax(axis=1), ("x", "y", "z"))}
    assert test_labels.tolist() == labels[:7].tolist()
    assert test_predicted.tolist() == probabilities[:7].argmax(axis=1).tolist()


def test_history_csv_has_one_row_per_epoch_and_nan_for_what_an_epoch_did_not_log(tmp_path):
    write_history(tmp_path / "h.csv", [{"epoch": 1, "loss": 1.23456789, "accuracy": 0.5, "val_loss": 2.0,
                                        "val_accuracy": 0.25}, {"epoch": 2, "loss": 0.5, "accuracy": 0.75}])
    assert (tmp_path / "h.csv").read_text() == ("epoch,loss,accuracy,val_loss,val_accuracy\n"
                                                "1,1.23457,0.5,2,0.25\n2,0.5,0.75,nan,nan\n")


def test_predictions_csv_pairs_each_actual_class_with_its_prediction(tmp_path):
    write_predictions(tmp_path / "p.csv", LABELS[:4], PREDICTED[:4], NAMES)
    assert (tmp_path / "p.csv").read_text() == "actual,predicted\na,a\na,a\na,d\nb,b\n"


@pytest.mark.parametrize("strategy", [None, 2])
def test_metrics_report_schema_timing_and_gain_over_the_baseline(strategy):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))  # 9 parameters
    evaluation = {"val": {"accuracy": 0.5, "loss": 1.0}, "test": {"accuracy": 0.75123456, "loss": 0.8}}
    seconds = 0.5 if strategy is None else 4.44  # under a second: images per second still divide by it
    progress = Progress(history=[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}], seconds=seconds, images_seen=100)
    result = Result(model, trainable_params=6, train_images=40, progress=progress, classes=("x", "y", "z"),
                    evaluation=evaluation)
    runtime = Runtime(gpus=0, mixed_precision=False, jit_compile=False, distribution=tf.distribute.get_strategy(),
                      distribute="none", workers=1, chief=True)
    baseline = {"test": {"accuracy": 0.6}} if strategy is not None else None
    report = metrics_report(result, strategy, runtime, stage_seconds=12.34, baseline=baseline)
    expected = {
        "strategy": strategy, "trainable_params": 6, "total_params": 9, **evaluation, "epochs": 3,
        "timing": {"wall_seconds": 12.3, "train_seconds": 0.5 if strategy is None else 4.4,
                   "train_images_per_second": 200.0 if strategy is None else 22.5},
        "runtime": {"gpus": 0, "mixed_precision": False, "jit_compile": False, "distribute": "none",
                    "replicas": 1, "workers": 1},
        "keep": "last", "kept_epoch": 3, "feature_cache": None,
    }
    if strategy is not None:
        expected |= {"train_images": 40, "gain_over_scratch": 0.151235}  # 0.75123456 - 0.6, to 6 digits
    assert report == expected
