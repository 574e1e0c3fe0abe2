"""The label-efficiency sweep: labelled subsets, and DVC experiments collected one row per point."""

from __future__ import annotations

import json
import sys

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from helpers import make_project, run, run_stage

from tools.dvc import dvc
from tools.label_efficiency import collect, plot
from transfer.errors import PipelineError
from transfer.paths import LABEL_EFFICIENCY_PLOT, LABEL_EFFICIENCY_TABLE, PREDICTIONS, metrics_file


def test_subset_trains_on_few_labels_and_evaluates_on_everything(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"data.target_labels_per_class": 3}, git=False)
    for stage in ("download", "split", "preprocess", "pretrain", "baseline", "finetune"):
        run_stage(stage, project, check=True)
    for name in ("finetune", "baseline"):
        metrics = json.loads((project / metrics_file(name)).read_text())
        assert metrics["train_images"] == 15  # 3 per class, class-balanced
    test_rows = (project / PREDICTIONS).read_text().splitlines()[1:]
    assert len(test_rows) == 20  # the whole target test split, untouched by the subset


def test_sweep_collects_one_row_per_strategy_labels_and_seed(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"finetune.epochs": 1})
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    result = run([sys.executable, "-m", "tools.label_efficiency", "--run",
                  "--labels", "2,null", "--strategies", "1,2", "--seeds", "7"], project)
    table = pd.read_csv(project / LABEL_EFFICIENCY_TABLE)
    assert len(table) == 6, result.stdout  # strategies 1 and 2, and the baseline (0), at two label counts
    assert not table.duplicated(["strategy", "labels_per_class", "seed"]).any()
    assert set(table["images_per_class"]) == {2, 11}
    assert set(table["strategy"]) == {0, 1, 2} and set(table["seed"]) == {7}
    assert set(table["strategy_name"]) == {"0: from scratch", "1: head only",
                                           "2: head + last 2 of small_cnn's 7 base layers"}
    assert (project / LABEL_EFFICIENCY_PLOT).read_bytes()[:4] == b"\x89PNG"


def shown_experiment(name: str, strategy: int, strategies: dict, accuracy: float) -> dict:
    """One experiment as `dvc exp show --json` shows it (JSON turns the integer keys into strings)."""
    params = {"strategy": strategy, "model": {"backbone": "small_cnn"}, "finetune": {"seed": 1},
              "data": {"target_labels_per_class": 10, "target_classes": ["dog", "frog"]},
              "strategies": {str(number): entry for number, entry in strategies.items()}}
    def result(accuracy: float) -> dict:
        return {"data": {"train_images": 20, "test": {"accuracy": accuracy, "macro_f1": accuracy}}}

    return {"name": name, "data": {"timestamp": name, "params": {"params.yaml": {"data": params}},
                                   "metrics": {"metrics/finetune.json": result(accuracy),
                                               "metrics/baseline.json": result(0.5)}}}


def test_strategies_are_named_from_each_experiments_params(tmp_path, monkeypatch, capsys):
    scratch = {"base_weights": "random", "trainable_base_layers": "all"}
    shown = [{"experiments": [{"revs": [
        shown_experiment("a", 3, {0: scratch, 3: {"frozen_base_layers": 3, "learning_rate": 0.0001}}, 0.6),
        shown_experiment("b", 3, {0: scratch, 3: {"frozen_base_layers": 5}}, 0.7),
        shown_experiment("old", 2, {0: scratch, 2: {"trainable_base_layers": 10}}, 0.8),  # before counts were checked
    ]}]}]
    table = collect(shown)
    assert table[table["strategy"] == 3]["strategy_name"].tolist() == [
        "3: head + small_cnn's base layers 3 on (of 7), learning_rate 0.0001",
        "3: head + small_cnn's base layers 5 on (of 7)"]  # one number defined two ways: two strategies
    assert table["strategy"].tolist() == [0, 3, 3]  # nor strategy 2 of "old"
    assert ("left out old, its strategies.2 is invalid (trainable_base_layers: 10 is more than small_cnn's "
            "7 base layers") in capsys.readouterr().out
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(table, tmp_path / "plot.png")
    legend = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["0: from scratch (1 seeds)",
                      "3: head + small_cnn's base layers 3 on (of 7), learning_rate 0.0001 (1 seeds)",
                      "3: head + small_cnn's base layers 5 on (of 7) (1 seeds)"]


def test_a_failed_dvc_command_is_one_line_naming_it_up_to_its_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a DVC project
    with pytest.raises(PipelineError) as raised:
        dvc("exp", "run", "--queue", "-S", "strategy=1,2", "-S", "finetune.seed=1,2,3")
    message = str(raised.value)
    assert message.startswith("`dvc exp run --queue ...` failed: ERROR: you are not inside of a DVC repository")
    assert "\n" not in message and "strategy=" not in message  # a profile's overrides would run on for lines
