"""The real `dvc` CLI over the whole pipeline, in a temporary git copy of the project at tiny sizes."""

from __future__ import annotations

import json

import pytest
from helpers import make_project, run
from http_server import serve

STAGES = ("download", "split", "preprocess", "baseline", "pretrain", "finetune", "figures")


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_archive):
    """A project that ran `dvc repro` once, downloading over HTTP from 127.0.0.1."""
    with serve({"cifar-10-python.tar.gz": tiny_archive}) as server:
        project = make_project(tmp_path_factory.mktemp("pipeline") / "p", tiny_archive,
                               {"data.url": f"{server.url}/cifar-10-python.tar.gz"})
        result = run(["dvc", "repro"], project)
    return project, result


def test_repro_runs_every_stage_and_writes_metrics(pipeline):
    project, result = pipeline
    assert ran(result.stdout) == list(STAGES)
    for name in ("pretrain", "baseline", "finetune"):
        metrics = json.loads((project / f"metrics/{name}.json").read_text())
        for split in ("train", "val", "test"):
            assert 0 <= metrics[split]["accuracy"] <= 1 and metrics[split]["loss"] > 0
        assert set(metrics["test"]["per_class"]) == (
            {"airplane", "automobile", "bird", "cat", "deer"} if name == "pretrain"
            else {"dog", "frog", "horse", "ship", "truck"})
        assert metrics["test"]["per_class_accuracy"] == {
            label: scores["recall"] for label, scores in metrics["test"]["per_class"].items()}
        assert metrics["epochs"] == 2 and metrics["timing"]["wall_seconds"] > 0
        assert metrics["trainable_params"] < metrics["total_params"] or name != "finetune"
        history = (project / f"metrics/{name}_history.csv").read_text().splitlines()
        assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy" and len(history) == 3
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    baseline = json.loads((project / "metrics/baseline.json").read_text())
    assert finetune["strategy"] == 1 and baseline["strategy"] == 0
    assert finetune["gain_over_scratch"] == round(finetune["test"]["accuracy"] - baseline["test"]["accuracy"], 6)
    assert baseline["trainable_params"] == baseline["total_params"]
    assert (project / "models/finetuned.keras").is_file()


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


def test_strategy_experiment_reruns_only_finetune_and_figures(pipeline):
    project, _ = pipeline
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    result = run(["dvc", "exp", "run", "-S", "strategy=2"], project)
    assert ran(result.stdout) == ["finetune", "figures"]  # not pretrain, not the baseline
    metrics = json.loads((project / "metrics/finetune.json").read_text())
    assert metrics["strategy"] == 2


def test_finetune_epochs_never_rerun_pretrain(pipeline):
    project, _ = pipeline
    result = run(["dvc", "exp", "run", "-S", "finetune.epochs=1"], project)
    assert ran(result.stdout) == ["baseline", "finetune", "figures"]  # the baseline uses finetune's settings
    assert json.loads((project / "metrics/finetune.json").read_text())["epochs"] == 1
