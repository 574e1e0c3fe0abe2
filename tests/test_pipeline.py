"""The real `dvc` CLI over the whole pipeline, in a temporary git copy of the project at tiny sizes."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest
from helpers import FINISHED, copy_project, md5_of, repickle, run

from transfer.records import dataset, open_split

STAGES = ("download", "split", "preprocess", "baseline", "pretrain", "finetune", "figures", "export")
EPOCHS = {"pretrain": FINISHED["pretrain.epochs"], "baseline": FINISHED["finetune.epochs"],
          "finetune": FINISHED["finetune.epochs"]}


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


@pytest.fixture
def pipeline(finished_project, tmp_path):
    """A copy of the project that ran `dvc repro` once from scratch, downloading over HTTP from 127.0.0.1
    (conftest.finished_project), and that run's output."""
    return copy_project(finished_project.project, tmp_path / "p"), finished_project.repro


def test_repro_runs_every_stage_and_writes_metrics(pipeline):
    project, result = pipeline
    assert ran(result.stdout) == list(STAGES)
    for name in ("pretrain", "baseline", "finetune"):
        metrics = json.loads((project / f"metrics/{name}.json").read_text())
        assert_scores_are_the_kept_epochs(project, name, metrics)
        assert set(metrics["test"]["per_class"]) == (
            {"airplane", "automobile", "bird", "cat", "deer"} if name == "pretrain"
            else {"dog", "frog", "horse", "ship", "truck"})
        assert metrics["test"]["per_class_accuracy"] == {
            label: scores["recall"] for label, scores in metrics["test"]["per_class"].items()}
        assert metrics["epochs"] == EPOCHS[name] and metrics["timing"]["wall_seconds"] > 0
        assert metrics["trainable_params"] < metrics["total_params"] or name != "finetune"
        history = (project / f"metrics/{name}_history.csv").read_text().splitlines()
        assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy" and len(history) == EPOCHS[name] + 1
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    baseline = json.loads((project / "metrics/baseline.json").read_text())
    assert finetune["strategy"] == 1 and baseline["strategy"] == 0
    assert finetune["gain_over_scratch"] == round(finetune["test"]["accuracy"] - baseline["test"]["accuracy"], 6)
    assert baseline["trainable_params"] == baseline["total_params"]
    assert (project / "models/finetuned.keras").is_file()


def assert_scores_are_the_kept_epochs(project, name: str, metrics: dict) -> None:
    """The stage's scores are its kept model's: validation as fit() measured it in the kept epoch (training.keep:
    best, the highest val_accuracy, the later on ties), and every split as the saved model scores it now."""
    rows = list(csv.DictReader((project / f"metrics/{name}_history.csv").open()))
    val_accuracies = [float(row["val_accuracy"]) for row in rows]
    kept = len(rows) - val_accuracies[::-1].index(max(val_accuracies))
    assert metrics["keep"] == "best" and metrics["kept_epoch"] == kept, (name, metrics["kept_epoch"], rows)
    assert metrics["val"]["accuracy"] == pytest.approx(val_accuracies[kept - 1], abs=1e-6), name
    assert metrics["val"]["loss"] == pytest.approx(float(rows[kept - 1]["val_loss"]), rel=1e-4), name  # 6 digits
    saved = {"pretrain": "models/pretrained.keras", "finetune": "models/finetuned.keras"}.get(name)
    if saved is None:  # the baseline's model is not kept
        return
    model = keras.models.load_model(project / saved)
    task = "source" if name == "pretrain" else "target"
    for split in ("train", "val", "test"):
        records = open_split(project / "data/tfrecords", task, split)
        probabilities, labels = [], []
        for images, batch_labels in dataset(records, 64):
            probabilities.append(model(images, training=False).numpy().astype(np.float64))
            labels.append(batch_labels.numpy())
        probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
        assert len(labels) == records.count
        accuracy = np.mean(probabilities.argmax(axis=1) == labels)
        loss = np.mean(-np.log(probabilities[np.arange(len(labels)), labels]))
        assert metrics[split]["accuracy"] == pytest.approx(accuracy, abs=1e-6), (name, split)
        assert metrics[split]["loss"] == pytest.approx(loss, abs=1e-5), (name, split)  # rounded to 6 decimals


def test_finetune_metrics_are_its_saved_models_predictions(pipeline):
    """finetune.json's test scores, recomputed from the predictions CSV; the CSV, from the saved model."""
    project, _ = pipeline
    metrics = json.loads((project / "metrics/finetune.json").read_text())["test"]
    rows = (project / "metrics/finetune_predictions.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted"
    written = [tuple(row.split(",")) for row in rows[1:]]
    split = open_split(project / "data/tfrecords", "target", "test")
    classes = split.classes
    assert classes == ("dog", "frog", "horse", "ship", "truck") and len(written) == split.count == 20
    model = keras.models.load_model(project / "models/finetuned.keras")
    predicted, actual = [], []
    for images, labels in dataset(split, 8):
        predicted += np.argmax(model(images, training=False).numpy(), axis=1).tolist()
        actual += labels.numpy().tolist()
    assert written == [(classes[a], classes[p]) for a, p in zip(actual, predicted)]  # in the records' order
    accuracy = sum(a == p for a, p in written) / len(written)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.5  # chance is 0.2: the model learned the tiny archive's classes
    for name in classes:
        hits = sum(a == p == name for a, p in written)
        said = sum(p == name for _, p in written)  # images predicted as `name`
        truth = sum(a == name for a, _ in written)  # images of class `name`
        precision, recall = (hits / said if said else 0.0), hits / truth
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        assert metrics["per_class"][name] == pytest.approx(
            {"precision": precision, "recall": recall, "f1": f1}, abs=1e-6), name
        assert metrics["per_class_accuracy"][name] == pytest.approx(recall, abs=1e-6)
    # With errors in the test set precision and recall differ somewhere: a swap of the two cannot pass.
    assert any(metrics["per_class"][name]["precision"] != metrics["per_class"][name]["recall"] for name in classes)


def test_dvc_reads_metrics_and_plots(pipeline):
    project, _ = pipeline
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = next(iter(shown.values()))["data"]
    assert "metrics/finetune.json" in files and "metrics/pretrain.json" in files
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    assert {"Training curves", "Loss curves", "metrics/finetune_predictions.csv",
            "metrics/figures/confusion_matrix.png"} <= set(plots)


def test_second_repro_reruns_nothing(pipeline):
    project, _ = pipeline
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout or "didn't change" in result.stdout
    assert "modified" not in run(["dvc", "status"], project).stdout


def test_strategy_experiment_reruns_only_finetune_figures_and_export(pipeline):
    project, _ = pipeline
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    result = run(["dvc", "exp", "run", "-S", "strategy=2"], project)
    assert ran(result.stdout) == ["finetune", "figures", "export"]  # not pretrain, not the baseline
    metrics = json.loads((project / "metrics/finetune.json").read_text())
    assert metrics["strategy"] == 2


def test_finetune_epochs_never_rerun_pretrain(pipeline):
    project, _ = pipeline
    result = run(["dvc", "exp", "run", "-S", "finetune.epochs=1"], project)
    assert ran(result.stdout) == ["baseline", "finetune", "figures", "export"]  # the baseline uses finetune's settings
    assert json.loads((project / "metrics/finetune.json").read_text())["epochs"] == 1


def test_switching_to_a_copy_of_the_same_images_reruns_only_download_and_split(pipeline, tiny_archive, tmp_path):
    """A source that holds the same images in other bytes (another pickle protocol) gives a byte-identical
    split, so nothing after split reruns, and metrics/download.json says where the archive came from."""
    project, _ = pipeline
    copy = repickle(tiny_archive, tmp_path / "cifar-10-python.tar.gz")
    assert md5_of(copy) != md5_of(tiny_archive)
    split_before = split_files(project)
    result = run(["dvc", "exp", "run", "-S", f"data.sources=[{{url:'{copy}',md5:'{md5_of(copy)}'}}]"], project)
    assert ran(result.stdout) == ["download", "split"]
    assert md5_of(project / "data/cifar-10-python.tar.gz") == md5_of(copy)
    assert split_files(project) == split_before
    assert json.loads((project / "metrics/download.json").read_text()) == {
        "source": 0, "url": str(copy), "md5": md5_of(copy)}


def split_files(project) -> dict[str, bytes]:
    return {path.relative_to(project).as_posix(): path.read_bytes()
            for path in sorted((project / "data/split").rglob("*")) if path.is_file()}
