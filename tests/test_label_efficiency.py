"""The label-efficiency sweep: labelled subsets, and DVC experiments collected one row per point."""

from __future__ import annotations

import json
import sys

import pandas as pd
from helpers import make_project, run, run_stage


def test_subset_trains_on_few_labels_and_evaluates_on_everything(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"data.target_labels_per_class": 3}, git=False)
    for stage in ("download", "split", "preprocess", "pretrain", "baseline", "finetune"):
        run_stage(stage, project, check=True)
    for name in ("finetune", "baseline"):
        metrics = json.loads((project / f"metrics/{name}.json").read_text())
        assert metrics["train_images"] == 15  # 3 per class, class-balanced
    test_rows = (project / "metrics/finetune_predictions.csv").read_text().splitlines()[1:]
    assert len(test_rows) == 20  # the whole target test split, untouched by the subset


def test_sweep_collects_one_row_per_strategy_labels_and_seed(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"finetune.epochs": 1})
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    result = run([sys.executable, "-m", "stages.label_efficiency", "--run",
                  "--labels", "2,null", "--strategies", "1,2", "--seeds", "7"], project)
    table = pd.read_csv(project / "metrics/label_efficiency.csv")
    assert len(table) == 6, result.stdout  # strategies 1 and 2, and the baseline (0), at two label counts
    assert not table.duplicated(["strategy", "labels_per_class", "seed"]).any()
    assert set(table["images_per_class"]) == {2, 11}
    assert set(table["strategy"]) == {0, 1, 2} and set(table["seed"]) == {7}
    assert (project / "metrics/label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
