"""The official CIFAR-10 "python version" archive: checking and reading it."""

from __future__ import annotations

import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer.errors import PipelineError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"{FOLDER}/data_batch_{n}" for n in range(1, 6))
TEST_BATCH = f"{FOLDER}/test_batch"
META = f"{FOLDER}/batches.meta"
REQUIRED = (*TRAIN_BATCHES, TEST_BATCH, META)


@dataclass(frozen=True)
class Cifar10:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64, indices into class_names
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def read_archive(path: Path) -> Cifar10:
    """Read every batch; a truncated, corrupt or foreign archive is a PipelineError."""
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if member.name in REQUIRED:
                    batches[member.name] = pickle.load(archive.extractfile(member), encoding="bytes")
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the download stage (dvc repro)") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError, ValueError) as error:
        raise PipelineError(
            f"{path} is truncated or corrupt ({type(error).__name__}); delete it and download again"
        ) from None
    missing = [name for name in REQUIRED if name not in batches]
    if missing:
        raise PipelineError(f"{path} is not a CIFAR-10 python archive: {missing[0]} is missing")
    try:
        train_images, train_labels = _stack(batches[name] for name in TRAIN_BATCHES)
        test_images, test_labels = _stack([batches[TEST_BATCH]])
        class_names = tuple(name.decode() for name in batches[META][b"label_names"])
    except (KeyError, ValueError, TypeError) as error:
        raise PipelineError(f"{path} is not a CIFAR-10 python archive: bad batch ({error})") from None
    return Cifar10(train_images, train_labels, test_images, test_labels, class_names)


def _stack(batches) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch in batches:
        # Each row is 3072 bytes: the red plane, then green, then blue, of a 32x32 image.
        rows = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        if len(images[-1]) != len(labels[-1]):
            raise ValueError("image and label counts differ")
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
