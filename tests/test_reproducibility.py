"""Two separate `dvc repro` runs with the same params and seed give the same data, models and metrics on the CPU."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import yaml
from helpers import FINISHED, copy_project, make_project, run, set_params

DATA_OUTPUTS = ("data/cifar-10-python.tar.gz", "data/split", "data/tfrecords")
MODELS = ("models/pretrained.keras", "models/finetuned.keras")
METRICS = ("metrics/pretrain.json", "metrics/finetune.json")


def output_hashes(project) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def without_timing(path) -> dict:
    metrics = json.loads(path.read_text())
    metrics.pop("timing")
    return metrics


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tiny_archive, finished_project):
    """Two runs from scratch with the same params: conftest.finished_project's and one more (data.sources aside: a
    local path here, HTTP there). Both then train the baseline and finetune without the feature cache, which
    also covers the checkpointing path: the first on its own records and pretrained model."""
    without_cache = {"finetune.cache_features": False}
    first = copy_project(finished_project.project, tmp_path_factory.mktemp("first") / "p")
    set_params(first / "params.yaml", without_cache)
    second = make_project(tmp_path_factory.mktemp("second") / "p", tiny_archive, {**FINISHED, **without_cache})
    for project in (first, second):
        run(["dvc", "repro", "finetune"], project)  # what the tests compare: figures and export add nothing
    return first, second


def test_data_outputs_have_identical_hashes(twins):
    first, second = (output_hashes(project) for project in twins)
    for path in DATA_OUTPUTS:
        assert first[path] == second[path], path


def test_metrics_and_histories_are_identical(twins):
    first, second = twins
    for path in METRICS:
        assert without_timing(first / path) == without_timing(second / path), path
    for path in ("metrics/pretrain_history.csv", "metrics/finetune_history.csv", "metrics/finetune_predictions.csv"):
        assert (first / path).read_text() == (second / path).read_text(), path


def test_models_have_identical_weights(twins):
    # The .keras files differ byte for byte (the zip holds the save time), so compare what they hold.
    first, second = twins
    for path in MODELS:
        weights = [keras.models.load_model(project / path).get_weights() for project in twins]
        assert len(weights[0]) == len(weights[1])
        for a, b in zip(*weights):
            assert np.array_equal(a, b), path
