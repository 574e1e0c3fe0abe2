"""Where the pipeline's files live, relative to the project root (dvc.yaml's folder), and what they hold.

dvc.yaml names the same files: a stage's outputs there are these paths.
"""

from __future__ import annotations

from pathlib import Path

TASKS = ("source", "target")  # pretrain learns the source task, finetune and baseline the target task
SPLITS = ("train", "val", "test")

DATA = Path("data")
ARCHIVE = DATA / "cifar-10-python.tar.gz"
SPLIT = DATA / "split"
RECORDS = DATA / "tfrecords"

MODELS = Path("models")
PRETRAINED_MODEL = MODELS / "pretrained.keras"
FINETUNED_MODEL = MODELS / "finetuned.keras"
EXPORT = MODELS / "export"  # the fine-tuned model for serving (SavedModel, TFLite) and its model card
# Weights files that model.weights may name. The folder is a dependency of the pretrain stage: DVC reruns it,
# and a checkpoint is discarded, when a file's content changes, not only its name.
WEIGHTS = Path("weights")
CHECKPOINTS = Path("checkpoints")  # checkpoints/<stage>: the resume state of an interrupted training stage


def feature_cache_folder(stage: str) -> Path:
    """The frozen prefix's cached output while a training stage runs (deleted when it ends)."""
    return CHECKPOINTS / stage / "features"


METRICS = Path("metrics")
FIGURES = METRICS / "figures"
DOWNLOAD_RECORD = METRICS / "download.json"  # which of data.sources the archive came from
LABEL_EFFICIENCY_TABLE = METRICS / "label_efficiency.csv"
LABEL_EFFICIENCY_PLOT = METRICS / "label_efficiency.png"


def metrics_file(stage: str) -> Path:
    """The metrics JSON of a training stage: pretrain, baseline or finetune."""
    return METRICS / f"{stage}.json"


def history_file(stage: str) -> Path:
    """Per-epoch loss and accuracy of a training stage, for DVC's plots."""
    return METRICS / f"{stage}_history.csv"


PREDICTIONS = METRICS / "finetune_predictions.csv"  # one row per target test image: actual, predicted


def resolve_local(path: str | Path) -> Path:
    """A user-given path, relative ones taken from the project root.

    `dvc exp run --queue` runs stages in a copy of the project under
    .dvc/tmp/exps/, where "../shared/..." would point inside .dvc; relative
    paths are resolved against the real project root instead.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = Path.cwd().resolve()
    parts = root.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            root = Path(*parts[:index])
            break
    return root / path
