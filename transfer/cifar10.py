"""The official CIFAR-10 "python version" archive: checking, reading and writing it.

The batches are pickles, and a pickle can run any code it names; an archive is data, so it is read
with an unpickler that resolves only the few numpy and codec globals a CIFAR-10 batch needs.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer.errors import PipelineError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"{FOLDER}/data_batch_{n}" for n in range(1, 6))
TEST_BATCH = f"{FOLDER}/test_batch"
META = f"{FOLDER}/batches.meta"
REQUIRED = (*TRAIN_BATCHES, TEST_BATCH, META)
PIXELS = 32 * 32 * 3


@dataclass(frozen=True)
class Cifar10:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64, indices into class_names
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); other codecs are no byte string.
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _array_globals() -> dict[tuple[str, str], object]:
    # Whatever module a pickle names them by (numpy.core in Python 2 and numpy 1.x, numpy._core in numpy 2),
    # arrays are rebuilt by the installed numpy's own functions, found through how it pickles an array.
    reconstruct = np.zeros(0).__reduce__()[0]
    frombuffer = np.zeros(0).__reduce_ex__(5)[0]  # protocol 5 rebuilds arrays from an in-band buffer
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed |= {(f"{package}.multiarray", "_reconstruct"): reconstruct,
                    (f"{package}.multiarray", "ndarray"): np.ndarray,
                    (f"{package}.multiarray", "dtype"): np.dtype,
                    (f"{package}.numeric", "_frombuffer"): frombuffer}
    return allowed


ALLOWED_GLOBALS = {**_array_globals(), ("_codecs", "encode"): _latin1_bytes}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles one batch, refusing every global but ALLOWED_GLOBALS before anything runs."""

    def __init__(self, file: io.BufferedIOBase, archive: Path, batch: str) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 `str`s become bytes, as the batches' keys are
        self.archive, self.batch = archive, batch

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ALLOWED_GLOBALS:
            raise PipelineError(f"{self.archive}: {self.batch} refers to {module}.{name}, "
                                "which a CIFAR-10 archive never needs; refusing to load it")
        return ALLOWED_GLOBALS[module, name]


def read_archive(path: Path) -> Cifar10:
    """Read every batch; a truncated, corrupt, foreign or out-of-range archive is a PipelineError."""
    batches = _load_batches(path)
    class_names = _class_names(path, batches[META])
    train = [_batch(path, name, batches[name], len(class_names)) for name in TRAIN_BATCHES]
    test_images, test_labels = _batch(path, TEST_BATCH, batches[TEST_BATCH], len(class_names))
    return Cifar10(np.ascontiguousarray(np.concatenate([images for images, _ in train])),
                   np.concatenate([labels for _, labels in train]), test_images, test_labels, class_names)


def _load_batches(path: Path) -> dict[str, object]:
    batches: dict[str, object] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if member.name in REQUIRED:
                    batches[member.name] = _unpickle(path, archive, member)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the download stage (dvc repro)") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as error:  # the last four: a damaged pickle calling numpy wrongly
        raise PipelineError(
            f"{path} is truncated or corrupt ({type(error).__name__}); delete it and download again"
        ) from None
    missing = [name for name in REQUIRED if name not in batches]
    if missing:
        raise PipelineError(f"{path} is not a CIFAR-10 python archive: {missing[0]} is missing")
    return batches


def _unpickle(path: Path, archive: tarfile.TarFile, member: tarfile.TarInfo) -> object:
    batch = _short(member.name)
    if not member.isfile():
        kind = "a directory" if member.isdir() else "a link or special file"
        raise PipelineError(f"{path} is not a CIFAR-10 python archive: {batch} is {kind}, not a file")
    return _BatchUnpickler(archive.extractfile(member), path, batch).load()


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _class_names(path: Path, meta: object) -> tuple[str, ...]:
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(name, bytes) for name in names):
        raise PipelineError(f"{path}: {_short(META)} has no list of class names under b'label_names'")
    try:
        return tuple(name.decode() for name in names)
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: {_short(META)} has a class name that is not UTF-8") from None


def _batch(path: Path, name: str, batch: object, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch, checked before any cast."""
    where = f"{path}: {_short(name)}"
    missing = [key for key in (b"data", b"labels") if not isinstance(batch, dict) or key not in batch]
    if missing:
        raise PipelineError(f"{where} is not a CIFAR-10 batch: it has no {missing[0]!r} entry")
    pixels = _array(where, "pixel", batch[b"data"], 255)
    labels = _array(where, "label", batch[b"labels"], classes - 1)
    if pixels.ndim != 2 or pixels.shape[1] != PIXELS:
        raise PipelineError(f"{where} has pixel data of shape {pixels.shape}, not N x {PIXELS}")
    if labels.shape != (len(pixels),):
        raise PipelineError(f"{where} has {len(pixels)} images but labels of shape {labels.shape}")
    _in_range(where, "pixel value", pixels, 255)
    _in_range(where, "label", labels, classes - 1)
    # Each row is 3072 bytes: the red plane, then green, then blue, of a 32x32 image.
    images = pixels.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def _array(where: str, what: str, values: object, high: int) -> np.ndarray:
    """`values` as an array, refused unless it holds integers (a cast would round anything else unseen)."""
    try:
        array = np.asarray(values)
    except ValueError:  # a ragged list
        raise PipelineError(f"{where} has {what} data that is not a regular array") from None
    if array.size and array.dtype.kind not in "ui":
        raise PipelineError(f"{where} has {what}s of type {array.dtype}, not integers 0..{high}")
    return array


def _in_range(where: str, what: str, array: np.ndarray, high: int) -> None:
    # Checked on the raw values: a cast to uint8 would wrap 256 to 0, and a label of 10 would be dropped later.
    outside = np.argwhere((array < 0) | (array > high))
    if len(outside):
        first = tuple(outside[0])
        raise PipelineError(f"{where} has {what} {array[first]} (image {first[0]}), outside 0..{high}")


def write_archive(path: Path, cifar: Cifar10, dumps: Callable[[dict], bytes] = pickle.dumps) -> Path:
    """Write `cifar` as an archive in the official layout (tests and benchmarks build smaller copies).

    `dumps` pickles each batch: tests pass other protocols, or a pickler that writes the way Python 2 did.
    """

    def add(archive: tarfile.TarFile, name: str, payload: dict) -> None:
        data = dumps(payload)
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
