"""Resumable training: a stage's identity, its per-epoch checkpoint, and when one may be resumed.

A checkpoint belongs to one run of one stage. Its identity is everything dvc.yaml says
the stage depends on, read from dvc.yaml itself: the command, every `deps` path by
content and the value of every listed param. A checkpoint is resumed only when that
identity is unchanged, so a dependency added to dvc.yaml is covered without touching
Python. A finished stage deletes its checkpoint: only an interrupted run leaves one.

Resuming continues the same run: the model file holds the weights, BatchNorm statistics
and optimizer state; the random state of layers such as Dropout (which Keras does not
save) is stored beside it, and every epoch's data order is a function of (seed, epoch).
With training.keep=best the weights of the best epoch so far are stored beside them too
(which epoch that is follows from the history in state.json), so a resumed run keeps the
same epoch as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import yaml

from transfer.config import PARAMS_FILE
from transfer.errors import PipelineError
from transfer.outputs import atomic_output, recover, remove
from transfer.paths import CHECKPOINTS

DVC_FILE = Path("dvc.yaml")
BEST_WEIGHTS = "best_weights.npz"  # beside model.keras: the weights of the best epoch so far (training.keep=best)


@dataclass
class Progress:
    """What a (possibly resumed) training run has done so far."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0
    # training.keep=best: the whole classifier's weights (get_weights() order) of the best epoch so far; saved
    # beside state.json (BEST_WEIGHTS), not in it.
    best: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def kept_epoch(self, keep: str) -> int:
        """The 1-based epoch whose weights the run keeps (training.keep): the last, or the one with the best
        validation accuracy, the later one on ties."""
        if keep == "last" or not self.history:
            return self.epochs_done
        scores = [entry["val_accuracy"] for entry in self.history]
        return len(scores) - scores[::-1].index(max(scores))


@dataclass(frozen=True)
class Checkpoints:
    """Where a stage keeps its resume state, and the identity that state must match."""

    folder: Path
    identity: dict
    global_batch: int | None = None  # images per step over all replicas: a resumed run must keep it

    @property
    def latest(self) -> Path:
        return self.folder / "latest"


def for_stage(stage: str, global_batch: int) -> Checkpoints:
    return Checkpoints(CHECKPOINTS / stage, stage_identity(stage), global_batch)


def stage_identity(stage: str, dvc_file: Path = DVC_FILE) -> dict:
    """{cmd, deps: {path: sha256 of its content}, params: {key: value}} of `stage` as dvc.yaml declares it.

    Hashing costs about a second per GB here (sha256, files in the page cache): small next to any training.
    """
    try:
        spec = yaml.safe_load(dvc_file.read_text())["stages"][stage]
    except (FileNotFoundError, KeyError, TypeError) as error:
        raise PipelineError(f"{dvc_file} has no stage {stage!r} ({type(error).__name__}): "
                            "run from the project root") from None
    params = {}
    for entry in spec.get("params", []):
        # dvc.yaml names params of params.yaml as plain keys, or of other files as {file: [keys]}.
        for file, keys in ({str(PARAMS_FILE): [entry]} if isinstance(entry, str) else entry).items():
            values = yaml.safe_load(Path(file).read_text())
            params.update({f"{file}:{key}": _lookup(values, key) for key in keys})
    deps = {}
    for dep in spec.get("deps", []):
        path = Path(dep)
        if not path.exists():
            raise PipelineError(f"{path} not found: it is a dependency of the {stage} stage (dvc repro)")
        deps[dep] = content_hash(path)
    # As state.json will read it back: JSON turns integer keys (strategies.0) into strings.
    return json.loads(json.dumps({"cmd": spec["cmd"], "deps": deps, "params": params}))


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    if path.is_file():
        with open(path, "rb") as reader:
            return hashlib.file_digest(reader, "sha256").hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{content_hash(file)}\0".encode())
    return digest.hexdigest()


def _lookup(values: object, dotted: str) -> object:
    for key in dotted.split("."):
        if isinstance(values, dict):
            values = values.get(int(key) if key.isdigit() and int(key) in values else key)
        else:
            return None
    return values


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two identities, by name (a dependency path, a param key or `cmd`)."""
    changed = ["cmd"] if old.get("cmd") != new["cmd"] else []
    for part in ("deps", "params"):
        before, after = old.get(part, {}), new[part]
        changed += sorted(name.removeprefix(f"{PARAMS_FILE}:") for name in before.keys() | after.keys()
                          if before.get(name) != after.get(name))
    return changed


def resume(checkpoints: Checkpoints, workers: int, chief: bool) -> tuple[keras.Model | None, Progress]:
    """The checkpointed model and progress if they belong to this run; any other checkpoint is deleted.

    A checkpoint that a killed save left half replaced is first completed or rolled back (outputs.recover):
    there is always the last one or the one before. A damaged one is deleted with one line, and training
    restarts from epoch 1. Call it in the distribution's scope. Several workers never resume: they would
    all have to load the same checkpoint, and the chief's folder is not theirs.
    """
    if workers > 1:
        if chief:
            remove(checkpoints.folder)
        return None, Progress()
    recover(checkpoints.latest)
    if (checkpoints.latest / "state.json").is_file():
        try:
            return _load(checkpoints)
        except _Unusable as reason:
            print(f"discarding checkpoint in {checkpoints.folder}: {reason}; training restarts from epoch 1")
    remove(checkpoints.folder)
    return None, Progress()


class _Unusable(Exception):
    """Why a checkpoint cannot be resumed: changed deps or params, another global batch, or a damaged file."""


def _load(checkpoints: Checkpoints) -> tuple[keras.Model, Progress]:
    latest = checkpoints.latest
    try:
        state = json.loads((latest / "state.json").read_text())
        identity, random_state = state.pop("identity"), state.pop("random_state")
        global_batch, has_best = state.pop("global_batch"), state.pop("best_weights")
        progress = Progress(**state)
        changed = changes(identity, checkpoints.identity)
        epochs = [entry["epoch"] for entry in progress.history]
        progress.kept_epoch("best")  # every epoch has a val_accuracy
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _Unusable(f"{latest / 'state.json'} is damaged ({type(error).__name__}: {error})") from None
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise _Unusable(f"{shown} changed since it was written")
    if epochs != list(range(1, len(epochs) + 1)):
        raise _Unusable(f"{latest / 'state.json'} is damaged (epochs {epochs})")
    if global_batch != checkpoints.global_batch:
        # The same per-replica batch on another number of replicas: the rest of the run would not be the same run.
        raise _Unusable(f"it was trained with a global batch of {global_batch}, this run's is "
                        f"{checkpoints.global_batch} (another number of replicas)")
    try:
        model = keras.models.load_model(latest / "model.keras")
    except Exception as error:  # Keras raises ValueError, OSError, KeyError... for a damaged file
        raise _Unusable(f"{latest / 'model.keras'} is damaged ({_first_line(error)})") from None
    try:
        _restore_random_state(model, random_state)
    except (ValueError, TypeError) as error:  # another count of random layers, or not a list of seeds
        raise _Unusable(f"{latest / 'state.json'} is damaged (its random_state does not fit the model: "
                        f"{_first_line(error)})") from None
    if has_best:
        try:
            weights = best_weights(checkpoints)
            expected = [weight.shape for weight in model.get_weights()]
            if weights is None or [weight.shape for weight in weights] != expected:
                raise ValueError("its weights do not fit the model")
            progress.best = weights
        except Exception as error:  # np.load raises BadZipFile, EOFError, ValueError... for a damaged file
            raise _Unusable(f"{latest / BEST_WEIGHTS} is damaged ({_first_line(error)})") from None
    print(f"resuming from {checkpoints.folder} after epoch {progress.epochs_done}")
    return model, progress


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def save(checkpoints: Checkpoints, model: keras.Model, progress: Progress,
         best_weights: list[np.ndarray] | None = None) -> None:
    """Write model, state and the best epoch's weights (if given) as one folder, flushed to disk before it
    replaces the last one: a kill or power cut at any moment leaves the old or the new one
    (outputs.atomic_output). A full disk is one line naming the folder, and the last checkpoint stays."""
    with atomic_output(checkpoints.latest) as latest:
        latest.mkdir()
        model.save(latest / "model.keras")
        if best_weights is not None:
            np.savez(latest / BEST_WEIGHTS, *best_weights)
        state = {"identity": checkpoints.identity, "random_state": _random_state(model),
                 "global_batch": checkpoints.global_batch, "best_weights": best_weights is not None,
                 **{name: value for name, value in vars(progress).items() if name != "best"}}
        (latest / "state.json").write_text(json.dumps(state, indent=2))


def best_weights(checkpoints: Checkpoints) -> list[np.ndarray] | None:
    """The best epoch's weights (model.get_weights() order) saved with the latest checkpoint, if any."""
    path = checkpoints.latest / BEST_WEIGHTS
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return [saved[f"arr_{index}"] for index in range(len(saved.files))]


def finish(stage: str) -> None:
    """The stage wrote its outputs: nothing is left to resume."""
    remove(CHECKPOINTS / stage)


def _random_variables(model: keras.Model) -> list:
    # `variables` holds the weights plus the layers' random-seed state (Dropout's SeedGenerator);
    # model.save() keeps only the weights.
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def _random_state(model: keras.Model) -> list[list[int]]:
    return [np.asarray(variable).tolist() for variable in _random_variables(model)]


def _restore_random_state(model: keras.Model, state: list[list[int]]) -> None:
    for variable, value in zip(_random_variables(model), state, strict=True):
        variable.assign(np.asarray(value, dtype=variable.dtype))
