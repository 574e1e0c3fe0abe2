"""The PNG figures drawn from what the training stages wrote: training curves, confusion matrix, prediction grid.

Drawn with matplotlib's Figure and its Agg canvas, not pyplot, so no display
is needed. `dvc plots` draws the interactive versions from the same CSV files.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transfer.errors import PipelineError
from transfer.paths import PREDICTIONS, history_file
from transfer.records import Split, dataset

if TYPE_CHECKING:
    import keras

HISTORIES = {"pretrain (source)": history_file("pretrain"), "finetune (target)": history_file("finetune"),
             "from scratch (target)": history_file("baseline")}
GRID_ROWS, GRID_COLUMNS = 4, 6
DPI = 80  # small files: they are committed to git


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file a training stage wrote; a missing one says to run those stages."""
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the training stages first (dvc repro)") from None


def training_curves(path: Path) -> None:
    """Accuracy and loss per epoch, train and val, of pretrain, finetune and the from-scratch baseline."""
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for (label, history), colour in zip(HISTORIES.items(), ("tab:gray", "tab:blue", "tab:orange")):
        rows = read_csv(history)
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
    """The fine-tuned model's confusion matrix on the target test set, from its predictions CSV."""
    index = {name: i for i, name in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for line, row in enumerate(read_csv(PREDICTIONS), start=2):  # line 1 is the header
        for column in ("actual", "predicted"):
            if row.get(column) not in index:  # another task's or run's classes, or an edited file
                raise PipelineError(f"{PREDICTIONS} line {line}: {column} class {row.get(column)!r} is not one of "
                                    f"the target classes ({', '.join(classes)}); rerun the finetune stage "
                                    "(dvc repro finetune)")
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


def prediction_grid(model: keras.Model, test: Split, path: Path) -> None:
    """The first GRID_ROWS x GRID_COLUMNS images of `test`, titled with the model's guess and the true label."""
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
    """Lay the figure out and write it as a small PNG."""
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
