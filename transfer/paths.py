"""Where the pipeline's files live, relative to the project root (dvc.yaml's folder)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
ARCHIVE = DATA / "cifar-10-python.tar.gz"
SPLIT = DATA / "split"
RECORDS = DATA / "tfrecords"
MODELS = Path("models")
PRETRAINED_MODEL = MODELS / "pretrained.keras"
FINETUNED_MODEL = MODELS / "finetuned.keras"
CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")
BASELINE_METRICS = METRICS / "baseline.json"
FIGURES = METRICS / "figures"


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
