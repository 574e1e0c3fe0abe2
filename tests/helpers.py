"""Test helpers: tiny CIFAR-10 archives in the official layout, and a project copy to run DVC in."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from transfer.cifar10 import Cifar10, read_archive, write_archive
from transfer.config import CIFAR10_CLASSES
from transfer.config import write_overrides as set_params  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "transfer", "tools", "profiles", "pyproject.toml", "weights")


def learnable_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """32x32 images whose mean colour depends on the class, plus noise, so a model can learn them."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(0).integers(30, 225, size=(len(CIFAR10_CLASSES), 3))
    noise = rng.normal(0, 25, size=(len(labels), 32, 32, 3))
    return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_learnable_archive(path: Path, train_per_class: int = 12, test_per_class: int = 4,
                            noise_seed: int = 1) -> Path:
    """A CIFAR-10 archive in the official python layout, with few images per class.

    Another noise_seed gives other pixels with the same labels and counts."""
    classes = len(CIFAR10_CLASSES)
    train_labels = np.tile(np.arange(classes), train_per_class)
    test_labels = np.tile(np.arange(classes), test_per_class)
    train_images = learnable_images(train_labels, noise_seed)
    test_images = learnable_images(test_labels, noise_seed + 1)
    return write_archive(path, Cifar10(train_images, train_labels, test_images, test_labels, CIFAR10_CLASSES))


def repickle(archive: Path, path: Path, protocol: int = 2) -> Path:
    """The same images, labels and layout as `archive`, in other bytes: its batches pickled at `protocol`."""
    return write_archive(path, read_archive(archive), dumps=lambda batch: pickle.dumps(batch, protocol=protocol))


def md5_of(path: Path) -> str:
    import hashlib

    return hashlib.md5(Path(path).read_bytes()).hexdigest()


TINY_PARAMS = {
    "model.backbone": "small_cnn",
    "model.weights": "none",
    "model.head_units": 16,
    "preprocess.image_size": 32,
    "preprocess.encoding": "raw",
    # Shards written in the stage's own process, not by one worker process per core: each would import TensorFlow
    # (4.4 CPU-s) to write a tiny archive's few shards. The output does not depend on the count; the tests of
    # several workers ask for 2.
    "preprocess.workers": 1,
    "pretrain.epochs": 2,
    "finetune.epochs": 2,
    "pretrain.batch_size": 8,
    "finetune.batch_size": 8,
    "training.steps_per_execution": 1,
    "training.shuffle_buffer": 64,
    # params.yaml's strategies 2 and 3 count InceptionV3's layers; these are the CPU profile's for small_cnn.
    "strategies.2.trainable_base_layers": 2,
    "strategies.3.frozen_base_layers": 3,
}
# conftest.finished_project's settings. JPEG records: the hard case for predict, which must repeat the JPEG round
# trip the training images took. At the tiny sizes' pretrain (2 epochs at 0.001) the head stays near chance on
# JPEG records (0.45); with these it learns the tiny archive's classes, so a test can tell a model that learned
# from one that did not: test accuracy 0.8, 0.8 and 0.7 for finetune.seed 42, 1 and 2 (1.0 and 0.6 with the top
# seed at 1 and 2), with errors left for precision and recall to differ (pretrain.epochs 6 reaches 1.0).
FINISHED = {"preprocess.encoding": "jpeg", "pretrain.epochs": 4, "pretrain.learning_rate": 0.003,
            "finetune.epochs": 10, "finetune.learning_rate": 0.01}


def sources(*archives: Path | tuple[str, Path]) -> list[dict]:
    """data.sources for archives (their path) or (url, archive) pairs (the url, the archive's md5)."""
    pairs = [item if isinstance(item, tuple) else (str(item), item) for item in archives]
    return [{"url": url, "md5": md5_of(archive)} for url, archive in pairs]


def make_project(folder: Path, archive: Path, overrides: dict | None = None, git: bool = True,
                 tiny: bool = True) -> Path:
    """A copy of the project in `folder`, set to tiny sizes (unless not `tiny`) and the given archive."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    (folder / ".gitignore").write_text("/data/\n/models/\n/checkpoints/\n__pycache__/\n")
    set_params(folder / "params.yaml", {**(TINY_PARAMS if tiny else {}), "data.sources": sources(archive),
                                       **(overrides or {})})
    if git:
        run(["git", "init", "-q"], folder)
        run(["git", "config", "user.name", "Test"], folder)  # dvc exp run commits experiments
        run(["git", "config", "user.email", "test@example.com"], folder)
        run(["dvc", "init", "-q"], folder)
        run(["dvc", "config", "core.analytics", "false"], folder)
        run(["git", "add", "-A"], folder)
        run(["git", "commit", "-qm", "project"], folder)
    return folder


def copy_project(source: Path, destination: Path) -> Path:
    """A copy of a project that ran, with its git repository, DVC cache and run-cache: DVC sees it up to date."""
    shutil.copytree(source, destination, symlinks=True)
    return destination


def environment() -> dict[str, str]:
    """The test's environment as it is now (tests may set TF_CONFIG and the like)."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str], cwd: Path, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """Run `command` in the background in its own process group, as a terminal runs a job.

    Its output goes to files, not pipes, so a chatty process never blocks on a full pipe.
    """
    logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, cwd=cwd, stdout=logs[0], stderr=logs[1], text=True, env=environment(),
                               start_new_session=True)
    process.logs = logs
    return process


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a process from start(); its exit code and output."""
    process.wait(timeout)
    texts = []
    for log in process.logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def run_stage(stage: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"stages.{stage}"], cwd, check=check)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def wait_until(condition: Callable[[], object], process, what: str, timeout: float = 240) -> None:
    """Poll until `condition` holds; fail (and stop `process`) if the process ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            result = finish(process)
            pytest.fail(f"never saw {what}; exit code {result.returncode}\n{result.stdout}\n{result.stderr}")
        time.sleep(0.02)


def epochs_checkpointed(folder: Path) -> int:
    state = folder / "latest" / "state.json"
    return len(json.loads(state.read_text())["history"]) if state.is_file() else 0


def weights(path: Path) -> list[np.ndarray]:
    """Every weight of a saved Keras model, in its order."""
    import keras

    return [weight.numpy() for weight in keras.models.load_model(path).weights]


def assert_same_weights(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    """The same weights to the last bit (a resumed run and an uninterrupted one)."""
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def metrics_without_timing(project: Path, stage: str) -> dict:
    """A stage's metrics JSON without its timings, which differ between two runs of the same training."""
    metrics = json.loads((project / f"metrics/{stage}.json").read_text())
    metrics.pop("timing")
    return metrics
