"""Stage: PNG figures to open directly, drawn from what the training stages wrote (transfer/plots.py).

Training curves of pretrain, finetune and the from-scratch baseline, the
fine-tuned model's test confusion matrix, and a grid of test images with
predicted and true labels. A separate stage, so that changing a figure never
retrains.
"""

from __future__ import annotations

from transfer.errors import run_stage
from transfer.models import load_model
from transfer.outputs import atomic_output
from transfer.paths import FIGURES, FINETUNED_MODEL, RECORDS
from transfer.plots import confusion_matrix, prediction_grid, training_curves
from transfer.records import open_split


def main() -> None:
    model = load_model(FINETUNED_MODEL, made_by="finetune")
    test = open_split(RECORDS, "target", "test")
    with atomic_output(FIGURES) as folder:
        folder.mkdir()
        training_curves(folder / "training_curves.png")
        confusion_matrix(test.classes, folder / "confusion_matrix.png")
        prediction_grid(model, test, folder / "test_predictions.png")
    print(f"figures: {', '.join(sorted(p.name for p in FIGURES.iterdir()))} -> {FIGURES}")


if __name__ == "__main__":
    run_stage(main)
