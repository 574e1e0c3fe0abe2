"""Stage: PNG figures to open directly, drawn from what the training stages wrote.

Training curves (accuracy and loss per epoch, pretrain, finetune and the
from-scratch baseline), the fine-tuned model's test confusion matrix, and a
grid of test images with predicted and true labels. A separate stage, so that
changing a figure never retrains; `dvc plots` draws the interactive versions
from the same CSV files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
from matplotlib.figure import Figure  # pyplot-free: drawn with the Agg canvas, no display needed
from matplotlib.ticker import MaxNLocator

from transfer.errors import PipelineError, run_stage
from transfer.outputs import atomic_output
from transfer.paths import FIGURES, FINETUNED_MODEL, METRICS, RECORDS
from transfer.records import dataset, open_split
from transfer.training import load_model

HISTORIES = {"pretrain (source)": "pretrain_history.csv", "finetune (target)": "finetune_history.csv",
             "from scratch (target)": "baseline_history.csv"}
GRID_ROWS, GRID_COLUMNS = 4, 6
DPI = 80  # small files: they are committed to git


def read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the training stages first (dvc repro)") from None


def training_curves(path: Path) -> None:
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for (label, name), colour in zip(HISTORIES.items(), ("tab:gray", "tab:blue", "tab:orange")):
        rows = read_csv(METRICS / name)
        epochs = [int(row["epoch"]) for row in rows]
        for axis, metric in zip(axes, ("accuracy", "loss")):
            axis.plot(epochs, [float(row[metric]) for row in rows], "--", color=colour, label=f"{label} train")
            axis.plot(epochs, [float(row[f"val_{metric}"]) for row in rows], "-", color=colour,
                      label=f"{label} val")
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.set(xlabel="epoch", ylabel=metric, title=metric)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(figure, path)


def confusion_matrix(classes: tuple[str, ...], path: Path) -> None:
    index = {name: i for i, name in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for row in read_csv(METRICS / "finetune_predictions.csv"):
        counts[index[row["actual"]], index[row["predicted"]]] += 1
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    figure = Figure(figsize=(5.5, 5))
    axis = figure.subplots()
    axis.imshow(counts, cmap="Blues")
    for (actual, predicted), count in np.ndenumerate(counts):
        colour = "white" if count > counts.max() / 2 else "black"
        axis.text(predicted, actual, str(count), ha="center", va="center", color=colour, fontsize=8)
    axis.set_xticks(range(len(classes)), classes, rotation=45)
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="actual", title=f"target test set, accuracy {accuracy:.3f}")
    save(figure, path)


def prediction_grid(model: keras.Model, path: Path) -> None:
    test = open_split(RECORDS, "target", "test")
    images, labels = next(iter(dataset(test, GRID_ROWS * GRID_COLUMNS)))
    predicted = np.asarray(model(images, training=False)).argmax(axis=1)
    figure = Figure(figsize=(GRID_COLUMNS * 1.5, GRID_ROWS * 1.7))
    axes = figure.subplots(GRID_ROWS, GRID_COLUMNS)
    for axis, image, label, guess in zip(axes.flat, images.numpy(), labels.numpy(), predicted):
        axis.imshow(image.astype(np.uint8))
        right = guess == label
        axis.set_title(f"{test.classes[guess]}\n(true: {test.classes[label]})", fontsize=7,
                       color="tab:green" if right else "tab:red")
        axis.axis("off")
    for axis in axes.flat[len(predicted):]:
        axis.axis("off")
    figure.suptitle("predicted (true) on target test images; red = wrong", fontsize=9)
    save(figure, path)


def save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def main() -> None:
    model = load_model(FINETUNED_MODEL, made_by="finetune")
    classes = open_split(RECORDS, "target", "test").classes
    with atomic_output(FIGURES) as folder:
        folder.mkdir()
        training_curves(folder / "training_curves.png")
        confusion_matrix(classes, folder / "confusion_matrix.png")
        prediction_grid(model, folder / "test_predictions.png")
    print(f"figures: {', '.join(sorted(p.name for p in FIGURES.iterdir()))} -> {FIGURES}")


if __name__ == "__main__":
    run_stage(main)
