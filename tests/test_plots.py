"""The figures: what they refuse to draw."""

from __future__ import annotations

import pytest

from transfer.errors import PipelineError
from transfer.paths import PREDICTIONS
from transfer.plots import confusion_matrix

CLASSES = ("cat", "dog")


def write_predictions(rows: list[str]) -> None:
    """The finetune stage's predictions CSV (transfer/reports.py writes it) with these rows."""
    PREDICTIONS.parent.mkdir(parents=True, exist_ok=True)
    PREDICTIONS.write_text("\n".join(["actual,predicted", *rows]) + "\n")


def test_the_confusion_matrix_is_drawn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_predictions(["cat,cat", "dog,cat"])
    confusion_matrix(CLASSES, tmp_path / "confusion_matrix.png")
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("row", "column", "name"), [("bird,cat", "actual", "'bird'"),
                                                     ("dog,frog", "predicted", "'frog'"),
                                                     ("dog", "predicted", "None")])
def test_a_class_the_plots_do_not_know_is_one_line(tmp_path, monkeypatch, row, column, name):
    """It was a KeyError traceback: predictions of another run, or an edited file."""
    monkeypatch.chdir(tmp_path)
    write_predictions(["cat,cat", row])
    with pytest.raises(PipelineError) as refused:
        confusion_matrix(CLASSES, tmp_path / "confusion_matrix.png")
    assert str(refused.value) == (f"{PREDICTIONS} line 3: {column} class {name} is not one of the target classes "
                                  "(cat, dog); rerun the finetune stage (dvc repro finetune)")
    assert not (tmp_path / "confusion_matrix.png").exists()
