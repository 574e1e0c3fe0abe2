"""A warm head (strategies' head_epochs): the head alone trains first, then the strategy's layers with their own
learning rate and optimizer, as one run that resumes from a kill in either phase to the uninterrupted result.

The project: small_cnn at 32 px, strategy 3 as the tiny sizes define it (the last two conv blocks after the
first three layers), with params.yaml's recipe (SGD at 1e-4, momentum 0.9) after HEAD_EPOCHS of the head.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import (
    assert_same_weights,
    copy_project,
    epochs_checkpointed,
    finish,
    make_project,
    metrics_without_timing,
    run,
    run_stage,
    set_params,
    start,
    wait_until,
    weights,
    write_learnable_archive,
)

from transfer.errors import PipelineError
from transfer.outputs import recover

HEAD_EPOCHS, EPOCHS = 3, 3  # phase 1, phase 2
WARM = {"strategy": 3, "strategies.3.head_epochs": HEAD_EPOCHS, "strategies.3.epochs": EPOCHS,
        "training.deterministic": True}
PLAIN = {"finetune.cache_features": False}  # every epoch through the base, checkpointed


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Target TFRecords, a pretrained small_cnn and the baseline's metrics: what finetune needs. 60 images per
    class, so that an epoch takes a moment to interrupt."""
    folder = tmp_path_factory.mktemp("warm")
    archive = write_learnable_archive(folder / "cifar-10-python.tar.gz", train_per_class=60, test_per_class=10)
    project = make_project(folder / "trained", archive, WARM)
    run(["dvc", "repro", "pretrain", "baseline"], project)
    return project


def project_copy(trained: Path, folder: Path, overrides: dict | None = None) -> Path:
    project = copy_project(trained, folder / "p")
    set_params(project / "params.yaml", overrides or {})
    return project


def outcome(project: Path) -> tuple[dict, str, list[np.ndarray]]:
    """finetune's metrics (timings aside), history and kept model."""
    metrics = metrics_without_timing(project, "finetune")
    metrics["feature_cache"].pop("seconds")
    return metrics, (project / "metrics/finetune_history.csv").read_text(), weights(project / "models/finetuned.keras")


def assert_same(project: Path, twin: Path) -> None:
    ours, theirs = outcome(project), outcome(twin)
    assert ours[:2] == theirs[:2]
    assert_same_weights(ours[2], theirs[2])


def in_process(project: Path, monkeypatch):
    """train_classifier as the finetune stage calls it, in this process, in `project`."""
    from transfer.config import load_params
    from transfer.runtime import set_up
    from transfer.training import open_task, train_classifier
    from transfer.training_stage import run_for

    monkeypatch.chdir(project)
    params = load_params()
    runtime = set_up(params.training.model_copy(update={"mixed_precision": False}), params.seed)
    return train_classifier(run_for("finetune", params), open_task("target"), params, runtime)


def test_phase_1_trains_the_head_alone_on_cached_features(trained, tmp_path, monkeypatch):
    """After phase 1 (the checkpoint a warm head leaves at its end: phase 2 on cached features writes none) every
    base weight is the pretrained one to the bit, and the head trained; phase 2 then trains the strategy's layers."""
    from transfer.config import load_params
    from transfer.training import build_classifier
    from transfer.training_stage import run_for

    project = project_copy(trained, tmp_path)
    result = in_process(project, monkeypatch)
    assert result.feature_cache["storage"] == "disk"
    assert [entry["phase"] for entry in result.progress.history] == [1] * HEAD_EPOCHS + [2] * EPOCHS
    assert (project / "metrics/finetune_history.csv").read_text().splitlines()[0].startswith("epoch,phase,")

    after_head = keras.models.load_model(project / "checkpoints/finetune/latest/model.keras")
    state = json.loads((project / "checkpoints/finetune/latest/state.json").read_text())
    assert [entry["phase"] for entry in state["history"]] == [1] * HEAD_EPOCHS
    pretrained = keras.models.load_model(project / "models/pretrained.keras")
    base = [layer for layer in pretrained.layers if isinstance(layer, keras.Model)][0]
    warmed = [layer for layer in after_head.layers if isinstance(layer, keras.Model)][0]
    assert base.weights and all(np.array_equal(a.numpy(), b.numpy())
                                for a, b in zip(base.weights, warmed.weights, strict=True))
    finished = [layer for layer in result.model.layers if isinstance(layer, keras.Model)][0]
    moved = [not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(base.weights, finished.weights, strict=True)]
    assert any(moved) and not any(moved[:2])  # phase 2 trained layers 3 on, not the frozen first ones
    fresh = build_classifier(run_for("finetune", load_params()), load_params(), 5, 32)  # the seeded fresh head
    for name in ("head_dense", "predictions"):
        for a, b in zip(fresh.get_layer(name).weights, after_head.get_layer(name).weights, strict=True):
            assert not np.array_equal(a.numpy(), b.numpy()), name  # the head trained in phase 1


def test_phase_2_trains_with_the_strategys_optimizer_and_learning_rate(trained, tmp_path, monkeypatch):
    project = project_copy(trained, tmp_path, PLAIN)
    result = in_process(project, monkeypatch)
    optimizer = result.model.optimizer
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert float(optimizer.learning_rate) == pytest.approx(1e-4) and optimizer.momentum == pytest.approx(0.9)
    assert int(optimizer.iterations) == EPOCHS * int(np.ceil(result.train_images / 8))  # a fresh one in phase 2
    assert [entry["phase"] for entry in result.progress.history] == [1] * HEAD_EPOCHS + [2] * EPOCHS


@pytest.fixture(scope="module")
def twins(trained, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: on cached features and through the base."""
    twins = {}
    for name, overrides in (("cached", {}), ("plain", PLAIN)):
        twins[name] = project_copy(trained, tmp_path_factory.mktemp(f"twin-{name}"), overrides)
        assert run_stage("finetune", twins[name]).returncode == 0
    return twins


def killed(project: Path, at_least: int) -> int:
    """Start finetune, kill -9 it once `at_least` epochs are checkpointed; the epochs checkpointed."""
    job = start([sys.executable, "-m", "stages.finetune"], project)
    wait_until(lambda: epochs_checkpointed(project / "checkpoints/finetune") >= at_least, job, "a checkpoint")
    os.killpg(job.pid, signal.SIGKILL)
    finish(job)
    recover(project / "checkpoints/finetune/latest")
    assert not (project / "models/finetuned.keras").exists()
    return epochs_checkpointed(project / "checkpoints/finetune")


@pytest.mark.parametrize(("path", "at_least", "phase"), [("plain", 1, 1), ("plain", HEAD_EPOCHS + 1, 2),
                                                        ("cached", HEAD_EPOCHS, 2)])
def test_a_kill_in_either_phase_resumes_to_the_uninterrupted_result(trained, twins, tmp_path, path, at_least, phase):
    """Through the base every epoch is checkpointed; on cached features the end of phase 1 is (phase 2 reruns
    from there, with a fresh optimizer as the uninterrupted run starts it)."""
    project = project_copy(trained, tmp_path, PLAIN if path == "plain" else {})
    done = killed(project, at_least)
    assert (1 <= done < HEAD_EPOCHS) if phase == 1 else (HEAD_EPOCHS <= done < HEAD_EPOCHS + EPOCHS), done
    result = run_stage("finetune", project)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoints/finetune after epoch {done}" in result.stdout
    assert ("(phase 1" in result.stdout) == (done < HEAD_EPOCHS)  # a finished phase 1 is not trained again
    assert_same(project, twins[path])


def test_unknown_values_are_one_line_errors_naming_the_parameter(tmp_path, monkeypatch):
    from helpers import ROOT

    from transfer.config import load_params

    for overrides, expected in (
            ({"strategies.3.optimizer": "adam"}, "strategies.3.optimizer: got 'adam'; input should be 'rmsprop' or "
                                                 "'sgd'"),
            ({"strategies.3.head_epochs": -1}, "strategies.3.head_epochs: got -1: Input should be greater than or "
                                               "equal to 0"),
            ({"strategies.1.momentum": 0.9}, "strategies.1: momentum: only sgd takes a momentum, this strategy's "
                                             "optimizer is rmsprop (the default)")):
        params = tmp_path / "params.yaml"
        params.write_text((ROOT / "params.yaml").read_text())
        set_params(params, overrides)
        with pytest.raises(PipelineError) as error:
            load_params(params)
        assert str(error.value) == f"{params}: {expected}"


def test_the_report_headline_names_the_phases():
    from tools.report import strategy_headline

    params = {"params.yaml": {"strategy": {"old": 1, "new": 3},
                              "model.backbone": {"old": "small_cnn", "new": "small_cnn"},
                              "strategies.1.trainable_base_layers": {"old": 0, "new": 0},
                              "strategies.3.frozen_base_layers": {"old": 3, "new": 3},
                              "strategies.3.head_epochs": {"old": 5, "new": 5},
                              "strategies.3.optimizer": {"old": "sgd", "new": "sgd"}}}
    assert strategy_headline(params, "main", "workspace") == (
        "**Fine-tuning strategy**: `main`: 1: head only; `workspace`: 3: head only for 5 epochs, then head + "
        "small_cnn's base layers 3 on (of 7), optimizer sgd")
    assert strategy_headline({"params.yaml": {"finetune.epochs": {"old": 1, "new": 2}}}, "main", "workspace") is None
