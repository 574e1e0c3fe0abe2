"""Comparing strategies the DVC way, and the pull-request report, in a temporary git copy at tiny sizes."""

from __future__ import annotations

import json
import sys
import time

import pytest
from helpers import make_project, run

from tools.dvc import queue_workers_running
from tools.label_efficiency import experiments as all_experiments
from transfer.paths import metrics_file

QUEUE_DEADLINE_S = 900  # a stuck queue worker fails the test instead of hanging it
COMPARISON_COLUMNS = ("(Experiment|(params.yaml:)?strategy|(metrics/finetune.json:)?(trainable_params|test.accuracy"
                      "|test.macro_f1|gain_over_scratch|timing.wall_seconds|timing.train_images_per_second))$")


def wait_for_queue(project) -> str:
    """Wait for the queue worker to finish (it leaves when the queue is empty), then report `dvc queue status`."""
    deadline = time.monotonic() + QUEUE_DEADLINE_S
    while queue_workers_running(project):
        if time.monotonic() > deadline:
            raise AssertionError("the experiment queue did not finish")
        time.sleep(0.5)  # reading pid files, not asking dvc: polling often costs nothing
    return run(["dvc", "queue", "status"], project).stdout


def experiments(project) -> dict[str, dict]:
    """{experiment name: its finetune metrics} from `dvc exp show --json`."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    return {revision["name"]: revision["data"]["metrics"][metrics_file("finetune").as_posix()]["data"]
            for revision in all_experiments(shown)}


@pytest.fixture(scope="module")
def queued(tmp_path_factory, tiny_archive):
    """Two strategies queued and run as the README says; pretrain has never run before."""
    project = make_project(tmp_path_factory.mktemp("experiments") / "p", tiny_archive)
    run(["dvc", "exp", "run", "--queue", "-S", "strategy=1,2"], project)
    run(["dvc", "queue", "start"], project)
    status = wait_for_queue(project)
    return project, status


def test_queued_strategies_both_show_up_with_their_trainable_params(queued):
    project, status = queued
    assert status.count("Success") == 2, status
    found = experiments(project)
    assert sorted(metrics["strategy"] for metrics in found.values()) == [1, 2]
    trainable = {metrics["strategy"]: metrics["trainable_params"] for metrics in found.values()}
    assert trainable[1] < trainable[2]
    for metrics in found.values():
        assert "gain_over_scratch" in metrics and set(metrics["test"]["per_class_accuracy"]) == {
            "dog", "frog", "horse", "ship", "truck"}


def test_pretrain_and_baseline_ran_once_for_both(queued):
    project, _ = queued
    logs = [run(["dvc", "queue", "logs", name], project).stdout for name in experiments(project)]
    for stage in ("pretrain", "baseline"):
        assert sum(f"Running stage '{stage}'" in log for log in logs) == 1
        assert sum(f"Stage '{stage}' is cached - skipping run" in log for log in logs) == 1
    assert all("Running stage 'finetune'" in log for log in logs)


def test_exp_show_md_keeps_the_comparison_columns(queued):
    project, _ = queued
    # The README's command.
    table = run(["dvc", "exp", "show", "--md", "--hide-workspace", "--drop", ".*", "--keep", COMPARISON_COLUMNS],
                project).stdout
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header == ["Experiment", "metrics/finetune.json:trainable_params", "metrics/finetune.json:test.accuracy",
                      "metrics/finetune.json:test.macro_f1", "metrics/finetune.json:timing.wall_seconds",
                      "metrics/finetune.json:timing.train_images_per_second", "gain_over_scratch",
                      "params.yaml:strategy"]
    assert len(table.strip().splitlines()) == 2 + 3  # header, rule, the baseline commit and two experiments


@pytest.fixture(scope="module")
def two_commits(queued):
    """The workspace reproduced and committed with strategy 1, then with strategy 2 (from the run-cache)."""
    project, _ = queued
    commits = []
    for strategy in (1, 2):
        run(["dvc", "exp", "run", "-S", f"strategy={strategy}"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", f"strategy {strategy}"], project)
        commits.append(run(["git", "rev-parse", "HEAD"], project).stdout.strip())
    return project, commits


def test_plots_show_draws_curves_confusion_and_figures(two_commits):
    project, _ = two_commits
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    for name in ("Training curves", "Loss curves"):
        lines = {row["filename::field"] for row in plots[name][0]["content"]["data"]["values"]}
        fields = ("accuracy", "val_accuracy") if name == "Training curves" else ("loss", "val_loss")
        assert lines == {f"{stage}_history.csv::{field}" for stage in ("pretrain", "finetune", "baseline")
                         for field in fields}
    confusion = plots["metrics/finetune_predictions.csv"][0]["content"]
    assert {row["actual"] for row in confusion["data"]["values"]} == {"dog", "frog", "horse", "ship", "truck"}
    for figure in ("training_curves", "confusion_matrix", "test_predictions"):
        entry = plots[f"metrics/figures/{figure}.png"][0]
        assert entry["type"] == "image"
        assert open(entry["url"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_shows_changed_metrics_params_and_plots(two_commits, tmp_path):
    project, (first, second) = two_commits
    output = tmp_path / "out" / "report.md"
    run([sys.executable, "-m", "tools.report", "--base", first, "--target", second, "--output", str(output)], project)
    report = output.read_text()
    rows = [line for line in report.splitlines() if line.startswith("|")]
    assert any("params.yaml" in row and "| strategy " in row and "| 1 " in row and "| 2 " in row for row in rows)
    assert any("metrics/finetune.json" in row and "trainable_params" in row for row in rows)
    images = [line for line in rows if "![" in line]
    assert images, report
    for line in images:
        for path in [part.split("](")[1].rstrip(") ") for part in line.split("|") if "](" in part]:
            assert (output.parent / path).is_file()


def test_report_names_an_unknown_base(queued, tmp_path):
    project, _ = queued
    result = run([sys.executable, "-m", "tools.report", "--base", "no-such-rev", "--output",
                  str(tmp_path / "r.md")], project, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: `dvc metrics diff no-such-rev --all --json` failed")
    assert not (tmp_path / "r.md").exists()
