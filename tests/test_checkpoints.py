"""A stage's checkpoint identity, read from dvc.yaml: what changes it and what does not."""

from __future__ import annotations

import os

import pytest
import yaml

from transfer.checkpoints import changes, stage_identity
from transfer.errors import PipelineError

DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "python -m stages.train",
            "deps": ["code.py", "data"],
            "params": ["seed", "strategies.2", {"other.yaml": ["lr"]}],
        }
    }
}
PARAMS = {"seed": 1, "unused": 5, "strategies": {1: {"layers": 0}, 2: {"layers": 10}}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "other.yaml").write_text("lr: 0.1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "data" / "part").mkdir(parents=True)
    (tmp_path / "data" / "part" / "a.bin").write_bytes(b"a")
    return tmp_path


def changed_after(edit) -> list[str]:
    before = stage_identity("train")
    edit()
    return changes(before, stage_identity("train"))


def set_param(path, key, value):
    values = yaml.safe_load(path.read_text())
    values[key] = value
    path.write_text(yaml.safe_dump(values))


def test_identity_holds_cmd_dep_contents_and_listed_params(project):
    identity = stage_identity("train")
    assert identity["cmd"] == "python -m stages.train"
    assert set(identity["deps"]) == {"code.py", "data"}
    assert identity["params"] == {"params.yaml:seed": 1, "params.yaml:strategies.2": {"layers": 10},
                                  "other.yaml:lr": 0.1}
    assert changes(identity, stage_identity("train")) == []


def test_a_changed_code_file_changes_the_identity(project):
    assert changed_after(lambda: (project / "code.py").write_text("x = 2\n")) == ["code.py"]


def test_data_folders_count_by_content_names_included(project):
    assert changed_after(lambda: (project / "data/part/a.bin").write_bytes(b"b")) == ["data"]
    assert changed_after(lambda: (project / "data/part/new.bin").write_bytes(b"")) == ["data"]
    assert changed_after(lambda: os.rename(project / "data/part/a.bin", project / "data/part/c.bin")) == ["data"]


def test_touching_a_file_without_changing_it_keeps_the_identity(project):
    assert changed_after(lambda: os.utime(project / "code.py", (0, 0))) == []


def test_listed_params_count_and_others_do_not(project):
    assert changed_after(lambda: set_param(project / "params.yaml", "seed", 2)) == ["seed"]
    assert changed_after(lambda: set_param(project / "params.yaml", "unused", 6)) == []
    strategies = {1: {"layers": 3}, 2: {"layers": 10}}
    assert changed_after(lambda: set_param(project / "params.yaml", "strategies", strategies)) == []
    strategies = {1: {"layers": 3}, 2: {"layers": 11}}
    assert changed_after(lambda: set_param(project / "params.yaml", "strategies", strategies)) == ["strategies.2"]
    assert changed_after(lambda: set_param(project / "other.yaml", "lr", 0.2)) == ["other.yaml:lr"]


def test_a_dependency_added_to_dvc_yaml_joins_the_identity(project):
    (project / "extra.py").write_text("")

    def add_dependency():
        spec = yaml.safe_load((project / "dvc.yaml").read_text())
        spec["stages"]["train"]["deps"].append("extra.py")
        (project / "dvc.yaml").write_text(yaml.safe_dump(spec))

    assert changed_after(add_dependency) == ["extra.py"]


def test_an_unknown_stage_is_one_line(project):
    with pytest.raises(PipelineError, match="dvc.yaml has no stage 'nope'"):
        stage_identity("nope")


def test_a_resumed_fit_keeps_the_best_epoch_of_an_uninterrupted_one(tmp_path):
    """training.keep=best across an interruption: the checkpoint carries the best weights so far, so a run
    stopped after its best epoch and resumed ends with the same kept epoch and weights as one never stopped."""
    import keras
    import numpy as np
    import tensorflow as tf

    from transfer.checkpoints import Checkpoints, Progress, resume
    from transfer.config import Training
    from transfer.runtime import set_up
    from transfer.training import compile_model, fit

    training = Training(shuffle_buffer=64, steps_per_execution=1, deterministic=True, mixed_precision=False,
                        jit_compile=False, distribute="none", keep="best")
    runtime = set_up(training, seed=0)
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(90, 8)).astype("float32")
    labels = (inputs @ rng.normal(size=(8, 3))).argmax(axis=1)
    train = tf.data.Dataset.from_tensor_slices((inputs[:60], labels[:60]))
    val = tf.data.Dataset.from_tensor_slices((inputs[60:], labels[60:])).batch(8)

    def epoch_data(epoch: int) -> tf.data.Dataset:
        return train.shuffle(60, seed=epoch).batch(8)

    def fitted(epochs: int, folder: str, model: keras.Model | None = None, progress: Progress | None = None):
        if model is None:
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                      keras.layers.Dense(3, activation="softmax")])
        compile_model(model, 1.0, training, runtime, optimizer=getattr(model, "optimizer", None))  # erratic
        saved = Checkpoints(tmp_path / folder, {"cmd": "test", "deps": {}, "params": {}})
        progress = fit(model, epoch_data, val, epochs, progress or Progress(), 60, runtime, saved, keep="best")
        return model, progress, saved

    epochs = 8
    whole, whole_progress, _ = fitted(epochs, "whole")
    kept = whole_progress.kept_epoch("best")
    scores = [entry["val_accuracy"] for entry in whole_progress.history]
    assert kept == max(epoch for epoch, score in enumerate(scores, 1) if score == max(scores))
    assert kept < epochs and scores[kept - 1] > scores[-1]  # the best is not the last: keeping it matters
    _, _, stopped = fitted(kept, "stopped")  # its checkpoint is what a kill after the best epoch leaves
    model, progress = resume(stopped, workers=1, chief=True)
    assert progress.epochs_done == kept
    resumed, resumed_progress, _ = fitted(epochs, "stopped", model, progress)
    assert resumed_progress.history == whole_progress.history and resumed_progress.kept_epoch("best") == kept
    for ours, theirs in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    last = resumed.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    assert last == pytest.approx(scores[kept - 1])  # the model holds the kept epoch's weights, not the last's
