"""InceptionV3 at 299 px, the reference resolution, through the real `dvc repro` on a handful of images.

Kept cheap for a slow CPU: 2 images per class and split, and nothing trains through the whole network: pretrain
trains only the head (on the cached pooled features), and so does the baseline, on a frozen random base, so each
stage runs InceptionV3 once over its images and trains a small rest on the cache.

No ImageNet weights here, and a random InceptionV3 is no base to learn from: its BatchNormalization layers'
statistics (mean 0, variance 1) do not match its activations, which shrink layer after layer to pooled features
of about 2e-4, the same for every image. So the base is random with its BatchNormalization statistics measured
once on the archive's images (a forward pass in training mode with momentum 0): its pooled features are then of
order 0.1 to 1 and keep the tiny archive's class colours, and the head can learn them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_project, run, set_params

from benchmarks.common import calibrate_batchnorm
from transfer.cifar10 import read_archive
from transfer.models import build_base
from transfer.paths import CHECKPOINTS
from transfer.records import dataset, open_split

TRAINED_EPOCHS = 10
REFERENCE = {
    "model.backbone": "inception_v3",
    "preprocess.image_size": 299,
    "data.max_per_class": 2,
    "pretrain.epochs": TRAINED_EPOCHS,
    "pretrain.batch_size": 2,  # a few steps an epoch on the handful of images
    "pretrain.trainable_base_layers": 0,
    "strategies.0.trainable_base_layers": 0,
    "finetune.epochs": TRAINED_EPOCHS,
    "finetune.batch_size": 2,
    "strategy": 2,
    "strategies.2.trainable_base_layers": 10,  # params.yaml's strategy 2: the prefix has six 8x8 maps
}


def calibrated_inception(archive: Path, path: Path, per_class: int = 1) -> Path:
    """A random InceptionV3 base whose BatchNormalization statistics are those of the archive's training images
    (per_class of each class, at 299 px), saved as a weights file for model.weights."""
    keras.utils.set_random_seed(0)  # the same base every run: another random base may leave the head nothing to learn
    base = build_base("inception_v3", 299, "none")
    data = read_archive(archive)
    chosen = np.concatenate([np.flatnonzero(data.train_labels == c)[:per_class] for c in range(len(data.class_names))])
    images = tf.image.resize(data.train_images[chosen].astype("float32"), (299, 299))
    calibrate_batchnorm(base, keras.applications.inception_v3.preprocess_input(images))  # the base takes -1..1
    path.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(path)
    return path


def test_inception_at_299_px_caches_strategy_2s_six_maps_on_disk(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, REFERENCE)
    calibrated_inception(tiny_archive, project / "weights/inception-calibrated.weights.h5")
    set_params(project / "params.yaml", {"model.weights": "weights/inception-calibrated.weights.h5"})
    result = run(["dvc", "repro", "finetune"], project)
    assert "finetune: caching the frozen prefix's 6 output(s) for" in result.stdout
    metrics = {stage: json.loads((project / f"metrics/{stage}.json").read_text())
               for stage in ("pretrain", "baseline", "finetune")}
    finetune = metrics["finetune"]
    cache = finetune["feature_cache"]
    assert cache["storage"] == "disk" and cache["dtype"] == "float16", cache
    assert finetune["train_images"] + 2 <= cache["images"] <= 20  # train, val and test: 2 a class at most each
    # Per image: 8x8 maps of 2,048 channels in all, 2 bytes each, plus a 4-byte label.
    assert cache["mib"] == round(cache["images"] * (8 * 8 * 2048 * 2 + 4) / 2**20, 1)
    for stage in ("pretrain", "baseline"):  # only the head trains: the pooled 2,048 features are cached
        assert metrics[stage]["feature_cache"]["storage"] == "disk" and metrics[stage]["trainable_params"] < 300_000
        assert metrics[stage]["feature_cache"]["mib"] < cache["mib"] / 10
    for stage, report in metrics.items():  # scores of the kept model: validation as fit() measured it
        history = list(csv.DictReader((project / f"metrics/{stage}_history.csv").open()))
        assert report["epochs"] == len(history) == TRAINED_EPOCHS, stage
        kept = history[report["kept_epoch"] - 1]
        assert report["val"]["accuracy"] == pytest.approx(float(kept["val_accuracy"]), abs=1e-6), stage
        assert report["val"]["loss"] == pytest.approx(float(kept["val_loss"]), rel=1e-4), stage
    # pretrain's head learnt from the calibrated base's pooled features: twice chance (0.2) or more on its 10 test
    # images; a random base without calibration, or one fed zeros, stays at 0.2. How well it learns depends on the
    # random base: seeds 0 to 5 gave 0.4, 0.3, 0.4, 0.2, 0.4, 0.4 (AMD EPYC), hence calibrated_inception's seed.
    assert metrics["pretrain"]["test"]["accuracy"] >= 0.4, metrics["pretrain"]["test"]
    # finetune's test scores are its predictions file's, and the whole saved network at 299 px, run on the test
    # records without the cache, predicts what the suffix trained on the six cached float16 maps predicted.
    rows = [row.split(",") for row in (project / "metrics/finetune_predictions.csv").read_text().splitlines()[1:]]
    assert finetune["test"]["accuracy"] == pytest.approx(np.mean([a == p for a, p in rows]), abs=1e-6)
    split = open_split(project / "data/tfrecords", "target", "test")
    model = keras.models.load_model(project / "models/finetuned.keras")
    probabilities = np.concatenate([model(images, training=False).numpy() for images, _ in dataset(split, 8)])
    assert [split.classes[i] for i in probabilities.argmax(axis=1)] == [p for _, p in rows]
    # Not one class for every image, as a base without features gives (finetune on a fresh random base instead of
    # the pretrained one predicts 'truck' for all 10).
    assert len({p for _, p in rows}) >= 2
    assert not (project / CHECKPOINTS).exists() or not any((project / CHECKPOINTS).rglob("*.bin"))
