"""The pull-request report (tools/report.py) over a two-commit project whose metrics are written by hand.

The metrics lead with a headline table (the headline metrics of each stage that changed, changed or not),
then the other changed metrics in collapsed <details> sections; every table has the columns of
`dvc metrics diff --md` (Path, Metric, base, target, Change) and Change is target minus base."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from helpers import ROOT, run

BASE = {"test": {"accuracy": 0.25, "loss": 1.5, "macro_f1": 0.2, "per_class_accuracy": {"dog": 0.5, "frog": 0.0},
                 "per_class": {"dog": {"f1": 0.4}, "frog": {"f1": 0.0}}},
        "trainable_params": 1000, "kept_epoch": 3, "timing": {"wall_seconds": 10.0, "train_seconds": 8.0}}
TARGET = {"test": {"accuracy": 0.75, "loss": 1.2, "macro_f1": 0.7, "per_class_accuracy": {"dog": 0.5, "frog": 1.0},
                   "per_class": {"dog": {"f1": 0.4}, "frog": {"f1": 0.8}}},
          "trainable_params": 1000, "kept_epoch": 5, "timing": {"wall_seconds": 12.5, "train_seconds": 8.0}}
COLUMNS = ["Path", "Metric", "base", "HEAD", "Change"]


def commit(project, metrics: dict, learning_rate: float, message: str) -> None:
    (project / "metrics/finetune.json").write_text(json.dumps(metrics))
    (project / "params.yaml").write_text(f"finetune:\n  learning_rate: {learning_rate}\n")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Commit `base` with BASE's metrics and learning rate 0.1, then HEAD with TARGET's and 0.01."""
    folder = tmp_path_factory.mktemp("report") / "p"
    for name in ("tools", "transfer"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "metrics").mkdir()
    (folder / "dvc.yaml").write_text("metrics:\n  - metrics/finetune.json\nparams:\n  - params.yaml\n")
    (folder / ".gitignore").write_text("__pycache__/\n/out/\n")
    for command in (["git", "init", "-q"], ["git", "config", "user.name", "Test"],
                    ["git", "config", "user.email", "test@example.com"], ["dvc", "init", "-q"]):
        run(command, folder)
    commit(folder, BASE, 0.1, "base")
    run(["git", "tag", "base"], folder)
    commit(folder, TARGET, 0.01, "target")
    return folder


def section_of(report: str, section: str) -> str:
    return report.split(f"### {section}\n", 1)[1].split("\n###", 1)[0]


def rows_of(text: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the Markdown table in `text`."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [row for row in rows if not set("".join(row)) <= set("-")]


def table(report: str, section: str) -> list[list[str]]:
    """The first Markdown table under `### section`: the headline one."""
    return rows_of(section_of(report, section).split("<details>", 1)[0])


def details(report: str, section: str) -> dict[str, list[list[str]]]:
    """{summary: its table's rows} of the collapsed <details> sections under `### section`."""
    found = {}
    for block in section_of(report, section).split("<details><summary>")[1:]:
        summary, rest = block.split("</summary>", 1)
        assert "</details>" in rest
        found[summary] = rows_of(rest.split("</details>", 1)[0])
    return found


def report_of(project, *arguments: str) -> str:
    output = project / "out/report.md"
    run([sys.executable, "-m", "tools.report", "--base", "base", *arguments, "--output", str(output)], project)
    return output.read_text()


def test_report_columns_are_base_then_target_and_change_is_target_minus_base(project):
    report = report_of(project, "--target", "HEAD")
    assert report.startswith("## Pipeline report: `HEAD` against `base`")
    headline = table(report, "Metrics")
    assert headline[0] == COLUMNS
    # The headline metrics of the changed stage, in a fixed order, unchanged ones included (Change 0).
    assert [row[:2] for row in headline[1:]] == [["metrics/finetune.json", metric] for metric in (
        "test.accuracy", "test.macro_f1", "trainable_params", "kept_epoch")]
    rows = {row[1]: row for row in headline[1:]}
    assert rows["test.accuracy"][2:] == ["0.25", "0.75", "0.5"]  # rose by 0.5
    assert rows["trainable_params"][2:] == ["1000", "1000", "0"]
    assert rows["kept_epoch"][2:] == ["3", "5", "2"]
    # Everything else that changed, and only that, in collapsed sections with the same columns.
    rest = details(report, "Metrics")
    assert list(rest) == ["Per-class test scores: 2 changed", "Timing: 1 changed", "Other metrics: 1 changed"]
    assert all(table[0] == COLUMNS for table in rest.values())
    per_class = {row[1]: row[2:] for row in rest["Per-class test scores: 2 changed"][1:]}
    assert per_class == {"test.per_class.frog.f1": ["0.0", "0.8", "0.8"],
                         "test.per_class_accuracy.frog": ["0.0", "1.0", "1.0"]}
    assert [row[1:] for row in rest["Timing: 1 changed"][1:]] == [["timing.wall_seconds", "10.0", "12.5", "2.5"]]
    [(path, metric, base, target, change)] = rest["Other metrics: 1 changed"][1:]
    assert (path, metric, base, target) == ("metrics/finetune.json", "test.loss", "1.5", "1.2")
    assert float(change) == pytest.approx(-0.3)  # fell: target minus base
    params = table(report, "Params")
    assert params[0] == ["Path", "Param", "base", "HEAD"]
    assert params[1][1:] == ["finetune.learning_rate", "0.1", "0.01"]


def test_report_without_target_compares_the_workspace(project):
    (project / "metrics/finetune.json").write_text(json.dumps({**BASE, "test": {**BASE["test"], "accuracy": 0.5}}))
    try:
        report = report_of(project)
    finally:
        run(["git", "checkout", "--", "metrics/finetune.json"], project)
    metrics = table(report, "Metrics")
    assert metrics[0] == ["Path", "Metric", "base", "workspace", "Change"]
    assert [row[1:] for row in metrics[1:]] == [["test.accuracy", "0.25", "0.5", "0.25"], [
        "test.macro_f1", "0.2", "0.2", "0.0"], ["trainable_params", "1000", "1000", "0"], ["kept_epoch", "3", "3", "0"]]
    assert "<details>" not in report  # nothing else changed


def test_report_of_no_change_says_so(project):
    report = report_of(project, "--target", "base")
    assert section_of(report, "Metrics").strip() == "No metric changed."


def test_build_report_in_process_shows_metrics_params_and_no_plot(project, monkeypatch, tmp_path):
    """The same report built in this process (mutation testing sees only in-process calls)."""
    from tools.report import build_report

    monkeypatch.chdir(project)
    report = build_report("base", "HEAD", tmp_path / "report.md")
    assert report.startswith("## Pipeline report: `HEAD` against `base`\n\n### Metrics\n\n")
    rows = {row[1]: row[2:] for row in table(report, "Metrics")[1:]}
    assert rows == {"test.accuracy": ["0.25", "0.75", "0.5"], "test.macro_f1": ["0.2", "0.7", "0.5"],
                    "trainable_params": ["1000", "1000", "0"], "kept_epoch": ["3", "5", "2"]}
    [(_, metric, *values)] = details(report, "Metrics")["Other metrics: 1 changed"][1:]
    assert (metric, values[:2]) == ("test.loss", ["1.5", "1.2"]) and float(values[2]) == pytest.approx(-0.3)
    assert table(report, "Params")[1][1:] == ["finetune.learning_rate", "0.1", "0.01"]
    assert report.endswith("### Plots\n\nNo plot changed.\n")
    workspace = build_report("base", None, tmp_path / "workspace.md")  # no target: the workspace (= HEAD here)
    assert workspace.startswith("## Pipeline report: this change against `base`\n")
    assert table(workspace, "Metrics")[0] == ["Path", "Metric", "base", "workspace", "Change"]


def vega(rows_by_revision: dict[str, list[dict]]) -> dict:
    values = [{**row, "rev": revision} for revision, rows in rows_by_revision.items() for row in rows]
    return {"type": "vega", "revisions": list(rows_by_revision), "content": {"data": {"values": values}}}


def image(revision: str, path) -> dict:
    return {"type": "image", "revisions": [revision], "url": str(path)}


def test_changed_plots_names_data_that_differ_and_images_redrawn_new_or_gone_base_first(tmp_path):
    from tools.report import changed_plots

    pictures = {}
    for name, content in {"old": b"1", "new": b"2", "same_a": b"3", "same_b": b"3", "added": b"4"}.items():
        pictures[name] = tmp_path / "plots" / f"{name}.png"
        pictures[name].parent.mkdir(exist_ok=True)
        pictures[name].write_bytes(content)
    loss = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}]
    plots = {
        "history.csv": [vega({"main": loss, "HEAD": [loss[0], {"epoch": 2, "loss": 0.5}]})],
        # The same rows in another order, their keys too.
        "unchanged.csv": [vega({"main": loss, "HEAD": [{"loss": 1.0, "epoch": 2}, {"loss": 2.0, "epoch": 1}]})],
        "empty.csv": [{"type": "vega", "revisions": ["main", "HEAD"], "content": {}}],
        "new.csv": [vega({"HEAD": loss})],
        "redrawn.png": [image("HEAD", pictures["new"]), image("main", pictures["old"])],
        "identical.png": [image("main", pictures["same_a"]), image("HEAD", pictures["same_b"])],
        "added.png": [image("HEAD", pictures["added"])],
    }
    data_plots, images = changed_plots(plots, ["main", "HEAD", "workspace"], tmp_path)
    assert data_plots == ["history.csv", "new.csv"]
    assert images == {"redrawn.png": [("main", pictures["old"].relative_to(tmp_path)),
                                      ("HEAD", pictures["new"].relative_to(tmp_path))],
                      "added.png": [("HEAD", pictures["added"].relative_to(tmp_path))]}
