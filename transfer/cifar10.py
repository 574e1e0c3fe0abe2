"""The official CIFAR-10 "python version" archive: checking, reading and writing it."""

from __future__ import annotations

import io
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


def write_archive(path: Path, cifar: Cifar10) -> Path:
    """Write `cifar` as an archive in the official layout (tests and benchmarks build smaller copies)."""

    def add(archive: tarfile.TarFile, name: str, payload: dict) -> None:
        data = pickle.dumps(payload)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    def batch(images: np.ndarray, labels: np.ndarray, label: str) -> dict:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
        return {b"batch_label": label.encode(), b"labels": [int(x) for x in labels], b"data": rows,
                b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}

    parts = np.array_split(np.arange(len(cifar.train_labels)), len(TRAIN_BATCHES))
    with tarfile.open(path, "w:gz") as archive:
        for name, part in zip(TRAIN_BATCHES, parts):
            add(archive, name, batch(cifar.train_images[part], cifar.train_labels[part], name))
        add(archive, TEST_BATCH, batch(cifar.test_images, cifar.test_labels, "testing batch 1 of 1"))
        add(archive, META, {b"label_names": [c.encode() for c in cifar.class_names],
                            b"num_cases_per_batch": len(parts[0]), b"num_vis": 3072})
    return path


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
