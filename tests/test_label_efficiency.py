"""The label-efficiency sweep: labelled subsets, and DVC experiments collected one row per point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from helpers import copy_project, last_line, run, run_stage, set_params

from tools.dvc import dvc
from tools.label_efficiency import Point, collect, grid, markdown, plot
from transfer.errors import PipelineError
from transfer.paths import LABEL_EFFICIENCY_PLOT, LABEL_EFFICIENCY_TABLE, PREDICTIONS, metrics_file


def test_subset_trains_on_few_labels_and_evaluates_on_everything(tmp_path, finished_project):
    # The records and the pretrained model of a project that ran; the subset is drawn by baseline and finetune.
    project = copy_project(finished_project.project, tmp_path / "p")
    set_params(project / "params.yaml", {"data.target_labels_per_class": 3})
    for stage in ("baseline", "finetune"):
        run_stage(stage, project, check=True)
    for name in ("finetune", "baseline"):
        metrics = json.loads((project / metrics_file(name)).read_text())
        assert metrics["train_images"] == 15  # 3 per class, class-balanced
    test_rows = (project / PREDICTIONS).read_text().splitlines()[1:]
    assert len(test_rows) == 20  # the whole target test split, untouched by the subset


# The tool waits for the queue's workers to leave. One that missed its shutdown message stays for ever (seen once,
# with --jobs 2: its monitor found the queue empty while its own experiment ran, and no shutdown ever reached it):
# the test then fails with the workers' logs instead of hanging the suite.
SWEEP_DEADLINE_S = 900


def sweep(project: Path, sweep_id: str, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tools.label_efficiency", "--sweep", sweep_id, *arguments]
    try:
        return run(command, project, check=False, timeout=SWEEP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        logs = [f"{path.name}: {path.read_text()[-1500:]}" for path in (project / ".dvc/tmp/exps/celery").glob("*.out")]
        raise AssertionError(f"sweep {sweep_id} still waiting after {SWEEP_DEADLINE_S} s;\n"
                             + "\n".join(logs)) from None


def test_sweep_keeps_exactly_its_experiments_and_refuses_a_failed_point(tmp_path, finished_project):
    # A copy of a project that ran: every point takes the data stages and pretrain from the run-cache and trains
    # its own baseline and finetune, at one epoch and params.yaml's learning rate.
    project = copy_project(finished_project.project, tmp_path / "p")
    set_params(project / "params.yaml", {"finetune.epochs": 1, "finetune.learning_rate": 0.001})
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    first = sweep(project, "a", "--run", "--labels", "2,null", "--strategies", "2", "--seeds", "7")
    assert first.returncode == 0, first.stderr
    table = pd.read_csv(project / LABEL_EFFICIENCY_TABLE)
    assert len(table) == 4, first.stdout  # strategy 2 and the baseline (0), at two label counts
    assert not table.duplicated(["strategy", "labels_per_class", "seed"]).any()
    assert set(table["images_per_class"]) == {2, 11}
    assert set(table["strategy"]) == {0, 2} and set(table["seed"]) == {7}
    assert set(table["strategy_name"]) == {"0: from scratch", "2: head + last 2 of small_cnn's 7 base layers"}
    # Each row carries the params it ran with, after the strategy's overrides.
    assert set(table["experiment"]) == {"a-2-7-s2", "a-all-7-s2"}
    assert set(table["epochs"]) == {1} and set(table["batch_size"]) == {8}
    assert set(table["learning_rate"]) == {0.001} and set(table["backbone"]) == {"small_cnn"}
    assert set(table["image_size"]) == {32} and set(table["weights"]) == {"none"}
    assert (project / LABEL_EFFICIENCY_PLOT).read_bytes()[:4] == b"\x89PNG"
    written = (project / LABEL_EFFICIENCY_TABLE).read_bytes(), (project / LABEL_EFFICIENCY_PLOT).read_bytes()

    # A second sweep with other settings and a strategy params.yaml lacks (4: strategy 2 with a warm head, added by
    # -S), one of whose points (strategy 9) does not exist: refused, nothing written.
    warm = "++strategies={4:{trainable_base_layers:2,head_epochs:1}}"  # "strategies.4=" is refused: a new key
    second = sweep(project, "b", "--run", "--labels", "2", "--strategies", "4,9", "--seeds", "8",
                   "-S", "finetune.learning_rate=0.01", "-S", warm)
    assert second.returncode == 1, second.stdout
    assert last_line(second).startswith("error: point b-2-8-s9 (labels_per_class=2, seed=8, strategy=9) failed")
    assert ((project / LABEL_EFFICIENCY_TABLE).read_bytes(), (project / LABEL_EFFICIENCY_PLOT).read_bytes()) == written

    # Told to skip, it says what it skips and writes sweep b's good points alone: nothing of sweep a.
    skipped = sweep(project, "b", "--labels", "2", "--strategies", "4,9", "--seeds", "8", "--skip-failed")
    assert skipped.returncode == 0, skipped.stderr
    assert "label_efficiency: skipped point b-2-8-s9 (labels_per_class=2, seed=8, strategy=9) failed" in skipped.stdout
    table = pd.read_csv(project / LABEL_EFFICIENCY_TABLE)
    # Its baseline and strategy 4 as the -S defined it.
    assert table["experiment"].tolist() == ["b-2-8-s4", "b-2-8-s4"]
    assert table["strategy"].tolist() == [0, 4] and table["head_epochs"].tolist() == [0, 1]
    assert table["strategy_name"].iloc[1] == ("4: head only for 1 epochs, then head + last 2 of small_cnn's 7 base "
                                              "layers")
    assert set(table["learning_rate"]) == {0.01} and set(table["seed"]) == {8}

    # Sweep a again, from `dvc exp show` alone: the same rows as when it ran, none of sweep b's.
    again = sweep(project, "a", "--labels", "2,null", "--strategies", "2", "--seeds", "7")
    assert again.returncode == 0, again.stderr
    assert (project / LABEL_EFFICIENCY_TABLE).read_bytes() == written[0]

    # A point that never ran is refused as missing.
    missing = sweep(project, "a", "--labels", "2", "--strategies", "2", "--seeds", "7,99")
    assert missing.returncode == 1
    assert last_line(missing).startswith("error: point a-2-99-s2 (labels_per_class=2, seed=99, strategy=2) never "
                                         "appeared in `dvc exp show`")

    # By default the sweep: 10, 50 and 250 labels per class with seeds 1, 2 and 3, 1,000 and all with seed 1.
    default = sweep(project, "z", "--strategies", "1,2")
    assert default.returncode == 1
    assert last_line(default).startswith("error: point z-10-1-s1 (labels_per_class=10, seed=1, strategy=1) never "
                                         "appeared in `dvc exp show`")
    assert "(and 21 more)" in last_line(default)  # 2 strategies x 11 points


def test_every_seed_runs_where_labels_are_few_and_the_first_seed_above():
    names = [point.name for point in grid("s", ["10", "250", "1000", "null"], ["1", "4"], ["7", "8"], "250")]
    # Strategy slowest: the queue's next experiment is another (labels, seed), whose baseline the run-cache lacks.
    assert names == ["s-10-7-s1", "s-10-8-s1", "s-250-7-s1", "s-250-8-s1", "s-1000-7-s1", "s-all-7-s1",
                     "s-10-7-s4", "s-10-8-s4", "s-250-7-s4", "s-250-8-s4", "s-1000-7-s4", "s-all-7-s4"]
    assert len(grid("s", ["10", "null"], ["1"], ["7", "8"], "null")) == 4  # null: every seed everywhere
    assert len(grid("s", ["10", "null"], ["1"], ["7", "8"], "9")) == 2
    for labels, limit, option in ((["10", "ten"], "250", "--labels: 'ten'"), (["10"], "0", "--seeds-up-to: '0'"),
                                  (["-5"], "250", "--labels: '-5'")):
        with pytest.raises(PipelineError, match=f"^{option} is neither a positive count of labels per class nor "
                                                r"null \(all\)$"):
            grid("s", labels, ["1"], ["7"], limit)


def shown_experiment(point: Point, strategies: dict, accuracy: float, train_images: int = 20, **extra: object) -> dict:
    """One experiment as `dvc exp show --json` shows it (JSON turns the integer keys into strings)."""
    params = {"strategy": int(point.strategy), "model": {"backbone": "small_cnn", "weights": "none"},
              "finetune": {"seed": int(point.seed), "epochs": 2, "batch_size": 8, "learning_rate": 0.001,
                           "cache_features": True},
              "preprocess": {"image_size": 32},
              "data": {"target_labels_per_class": None if point.labels == "null" else int(point.labels),
                       "target_classes": ["dog", "frog"]},
              "strategies": {str(number): entry for number, entry in strategies.items()}}
    def result(accuracy: float) -> dict:
        return {"data": {"train_images": train_images, "test": {"accuracy": accuracy, "macro_f1": accuracy}}}

    return {"name": point.name, **extra, "data": {"params": {"params.yaml": {"data": params}},
                                                  "metrics": {"metrics/finetune.json": result(accuracy),
                                                              "metrics/baseline.json": result(0.5)}}}


SCRATCH = {"base_weights": "random", "trainable_base_layers": "all"}


def test_strategies_are_named_from_each_experiments_params(tmp_path, monkeypatch, capsys):
    a, b, old = Point("a", "10", "1", "3"), Point("b", "10", "1", "3"), Point("old", "10", "1", "2")
    shown = [{"experiments": [{"revs": [
        shown_experiment(a, {0: SCRATCH, 3: {"frozen_base_layers": 3, "learning_rate": 0.0001}}, 0.6),
        shown_experiment(b, {0: SCRATCH, 3: {"frozen_base_layers": 5}}, 0.7),
        shown_experiment(old, {0: SCRATCH, 2: {"trainable_base_layers": 10}}, 0.8),  # before counts were checked
    ]}]}]
    with pytest.raises(PipelineError, match=r"^point old-10-1-s2 \(labels_per_class=10, seed=1, strategy=2\) its "
                                            r"strategies.2 is invalid \(trainable_base_layers: 10 is more than"):
        collect(shown, [a, b, old])
    table = collect(shown, [a, b, old], skip_failed=True)
    assert "label_efficiency: skipped point old-10-1-s2" in capsys.readouterr().out
    assert table[table["strategy"] == 3]["strategy_name"].tolist() == [
        "3: head + small_cnn's base layers 3 on (of 7), learning_rate 0.0001",
        "3: head + small_cnn's base layers 5 on (of 7)"]  # one number defined two ways: two strategies
    assert table[table["strategy"] == 3]["learning_rate"].tolist() == [0.0001, 0.001]  # after the overrides
    assert table["strategy"].tolist() == [0, 3, 3]  # one baseline: a's and b's trained alike; nor "old"'s strategy 2
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(table, tmp_path / "plot.png")
    legend = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["0: from scratch (1 seeds)",
                      "3: head + small_cnn's base layers 3 on (of 7), learning_rate 0.0001 (1 seeds)",
                      "3: head + small_cnn's base layers 5 on (of 7) (1 seeds)"]


def test_the_table_gives_each_strategys_mean_and_spread_per_label_count_the_best_in_bold(tmp_path, monkeypatch):
    strategies = {0: SCRATCH, 2: {"trainable_base_layers": 2}, 4: {"trainable_base_layers": 2, "head_epochs": 5}}
    accuracies = {("10", "1", "2"): 0.6, ("10", "2", "2"): 0.7, ("10", "1", "4"): 0.7, ("10", "2", "4"): 0.8,
                  ("20", "1", "2"): 0.9, ("20", "1", "4"): 0.85, ("null", "1", "2"): 0.95}
    points = [Point("m", *key) for key in accuracies]
    shown = [{"experiments": [{"revs": [
        shown_experiment(point, strategies, accuracy,
                         train_images=90 if point.labels == "null" else 2 * int(point.labels))
        for point, accuracy in zip(points, accuracies.values(), strict=True)]}]}]
    table = collect(shown, points)  # the baseline at 50 %: one row per (labels, seed)
    assert markdown(table) == """\
| labelled images per class | 0 | 2 | 4 |
| --- | --- | --- | --- |
| 10 | 50.0 ± 0.0 | 65.0 ± 7.1 | **75.0 ± 7.1** |
| 20 | 50.0 | **90.0** | 85.0 |
| all (45) | 50.0 | **95.0** |  |

- 0: from scratch
- 2: head + last 2 of small_cnn's 7 base layers
- 4: head only for 5 epochs, then head + last 2 of small_cnn's 7 base layers"""
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(table, tmp_path / "plot.png")
    axes = figures[0].axes[0]
    assert [line.get_linestyle() for line in axes.get_lines()] == ["-", "-", "--"]  # a warm head dashed
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "0: from scratch (1-2 seeds)", "2: head + last 2 of small_cnn's 7 base layers (1-2 seeds)",
        "4: head only for 5 epochs, then head + last 2 of small_cnn's 7 base layers (1-2 seeds)"]


def test_a_failed_experiment_with_its_parents_metrics_is_no_data_point():
    """`dvc exp show` gives a failed experiment its parent commit's metrics, beside an "error"."""
    good, failed = Point("s", "5", "1", "1"), Point("s", "5", "9", "1")
    shown = [{"experiments": [
        {"revs": [shown_experiment(good, {0: SCRATCH, 1: {"trainable_base_layers": 0}}, 0.6)]},
        {"executor": {"state": "failed"}, "name": failed.name,
         "revs": [shown_experiment(failed, {0: SCRATCH, 1: {"trainable_base_layers": 0}}, 0.52,
                                   error={"msg": "stage finetune failed"})]},
    ]}]
    with pytest.raises(PipelineError) as refused:
        collect(shown, [good, failed])
    assert str(refused.value) == ("point s-5-9-s1 (labels_per_class=5, seed=9, strategy=1) failed (stage finetune "
                                  "failed); see `dvc queue logs s-5-9-s1`; nothing written (--skip-failed leaves "
                                  "failed points out)")  # one problem: no "(and N more)"
    assert collect(shown, [good, failed], skip_failed=True)["experiment"].tolist() == [good.name, good.name]


def test_a_failed_dvc_command_is_one_line_naming_it_up_to_its_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a DVC project
    with pytest.raises(PipelineError) as raised:
        dvc("exp", "run", "--queue", "-S", "strategy=1,2", "-S", "finetune.seed=1,2,3")
    message = str(raised.value)
    assert message.startswith("`dvc exp run --queue ...` failed: ERROR: you are not inside of a DVC repository")
    assert "\n" not in message and "strategy=" not in message  # a profile's overrides would run on for lines


def test_rows_carry_each_runs_numbers_and_unfinished_or_failed_runs_are_refused(capsys):
    strategies = {0: SCRATCH, 1: {"trainable_base_layers": 0}}
    every = Point("t", "null", "1", "1")
    failed, errored, unfinished, unwritten, queued = (Point("t", "10", seed, "1") for seed in "23456")
    finished = shown_experiment(Point("t", "10", "1", "1"), strategies, 0.6)
    del finished["name"]  # a queued experiment's name sits on its range, not on the revision
    finished["data"]["params"]["params.yaml"]["data"]["data"]["target_labels_per_class"] = None
    for file, accuracy in (("metrics/finetune.json", 0.6), ("metrics/baseline.json", 0.5)):
        finished["data"]["metrics"][file]["data"] = {"train_images": 25,
                                                     "test": {"accuracy": accuracy, "macro_f1": accuracy - 0.1}}
    running = shown_experiment(unfinished, strategies, 0.7)
    del running["data"]["metrics"]["metrics/finetune.json"]["data"]["test"]  # only the parent's keys: no test
    no_metrics = shown_experiment(unwritten, strategies, 0.7)
    del no_metrics["data"]["metrics"]["metrics/finetune.json"]
    shown = [{"experiments": [
        {"name": every.name, "revs": [finished]},
        {"executor": {"state": "failed"}, "revs": [shown_experiment(failed, strategies, 0.7)]},  # no "error"
        {"revs": [shown_experiment(errored, strategies, 0.7, error={"msg": "boom"})]},
        {"executor": {"state": "running"}, "revs": [running]},
        {"revs": [no_metrics]},
        {"executor": {"state": "queued"}, "name": queued.name, "revs": [{"rev": "abc"}]},  # nothing shown yet
        {"name": "no-revisions"},
    ]}]
    points = [every, failed, errored, unfinished, unwritten, queued]
    with pytest.raises(PipelineError) as refused:
        collect(shown, points)
    assert str(refused.value) == (f"point {failed} failed (failed); see `dvc queue logs {failed.name}` (and 4 more); "
                                  "nothing written (--skip-failed leaves failed points out)")
    capsys.readouterr()
    table = collect(shown, points, skip_failed=True)
    assert capsys.readouterr().out.splitlines() == [
        f"label_efficiency: skipped point {failed} failed (failed); see `dvc queue logs {failed.name}`",
        f"label_efficiency: skipped point {errored} failed (boom); see `dvc queue logs {errored.name}`",
        f"label_efficiency: skipped point {unfinished} has no metrics/finetune.json (state running)",
        f"label_efficiency: skipped point {unwritten} has no metrics/finetune.json (state unknown)",
        f"label_efficiency: skipped point {queued} has no metrics/finetune.json (state queued)"]
    assert table.index.tolist() == [0, 1]
    assert table.to_dict("records") == [
        {"experiment": every.name, "strategy": strategy, "strategy_name": name, "labels_per_class": "all",
         "seed": 1, "head_epochs": 0, "epochs": 2, "batch_size": 8, "learning_rate": 0.001, "backbone": "small_cnn",
         "weights": "none", "image_size": 32, "images_per_class": 12, "test_accuracy": accuracy,
         "test_macro_f1": pytest.approx(accuracy - 0.1)}
        for strategy, name, accuracy in ((0, "0: from scratch", 0.5), (1, "1: head only", 0.6))]
