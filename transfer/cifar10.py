"""The official CIFAR-10 "python version" archive: checking, reading and writing it.

The batches are pickles, and a pickle can run any code it names and ask for any amount of memory. An archive
is data, so it is read within hard bounds, each checked before the memory it guards is taken:
- each tar member and header is no larger than an official one can be, checked in its header before reading;
- each pickle is scanned before it is unpickled (transfer/pickle_scan.py): only opcodes that build plain
  data, a bounded number of them, tuples nested a few deep (hashing deeper ones overflows the C stack), and memo
  indices that do not make the C unpickler allocate room for indices never used (a 10-byte pickle could
  otherwise take gigabytes);
- the unpickler's only globals (transfer/pickle_load.py) are numpy's array rebuilders and `_codecs.encode`, each
  replaced by a function that checks its arguments (integer or float types, C order, a shape that the bytes it
  is given fill exactly) and counts what it builds against twice the member's size, before numpy or the codec
  allocates anything.
So reading takes a small multiple of the members' total size (64 MiB a batch at most), whatever the pickles
declare.
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
from transfer.pickle_load import BatchUnpickler, Checks
from transfer.pickle_scan import scan

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"{FOLDER}/data_batch_{n}" for n in range(1, 6))
TEST_BATCH = f"{FOLDER}/test_batch"
META = f"{FOLDER}/batches.meta"
REQUIRED = (*TRAIN_BATCHES, TEST_BATCH, META)
PIXELS = 32 * 32 * 3
MAX_ROWS = 10_000  # images in an official batch
# A batch pickles 10,000 rows of 3,072 bytes: the official (Python 2) pickles store them as they are (31,035,704
# bytes a batch), Python 3's protocol 2 (the shared copy, 44.8 MB a batch) as latin-1 text in UTF-8, up to two
# bytes each; the rest of the room is for 10,000 labels and file names.
MAX_BATCH_BYTES = 64 << 20
MAX_META_BYTES = 16 << 10  # ten class names: 158 bytes officially, 354 in the shared copy
MAX_MEMBERS = 64  # the official archive has 9
MAX_TAR_HEADER_BYTES = 64 << 10  # a pax header or GNU long name, which tarfile reads whole


@dataclass(frozen=True)
class Cifar10:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64, indices into class_names
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def read_archive(path: Path) -> Cifar10:
    """Read every batch; a truncated, corrupt, foreign, oversized or out-of-range archive is a PipelineError."""
    batches = _load_batches(path)
    class_names = _class_names(path, batches[META])
    train = [_batch(path, name, batches[name], len(class_names)) for name in TRAIN_BATCHES]
    test_images, test_labels = _batch(path, TEST_BATCH, batches[TEST_BATCH], len(class_names))
    return Cifar10(np.concatenate([images for images, _ in train]),
                   np.concatenate([labels for _, labels in train]), test_images, test_labels, class_names)


# --- the tar layer -------------------------------------------------------------------------------------------


class _Refused(Exception):
    """A tar header over its bound; _load_batches names the archive."""


class _BoundedTarInfo(tarfile.TarInfo):
    EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile reads an extended header whole, allocating what its size field says before it reads a byte.
        if self.type in self.EXTENDED and self.size > MAX_TAR_HEADER_BYTES:
            raise _Refused(f"has a tar header of {self.size:,} bytes, more than the {MAX_TAR_HEADER_BYTES:,} "
                           "a CIFAR-10 archive needs; refusing to read it")
        # A sparse member's map is read block after block for as long as the blocks say so, with no bound.
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"has a sparse member ({self.name}), which a CIFAR-10 archive never has; refusing it")
        return super()._proc_member(archive)


def _load_batches(path: Path) -> dict[str, object]:
    batches: dict[str, object] = {}
    try:
        with tarfile.open(path, "r:gz", tarinfo=_BoundedTarInfo) as archive:
            for count, member in enumerate(archive, 1):
                if count > MAX_MEMBERS:
                    raise _Refused(f"has more than {MAX_MEMBERS} members (the official one has 9); refusing it")
                _check_size(path, member)
                if member.name in REQUIRED:
                    if member.name in batches:
                        raise PipelineError(f"{path}: {_short(member.name)} appears twice; refusing the archive")
                    batches[member.name] = _unpickle(path, archive, member)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the download stage (dvc repro)") from None
    except _Refused as refused:
        raise PipelineError(f"{path} {refused}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, RecursionError) as error:  # RecursionError: a chain
        raise PipelineError(                                                             # of pax headers
            f"{path} is truncated or corrupt ({type(error).__name__}); delete it and download again"
        ) from None
    missing = [name for name in REQUIRED if name not in batches]
    if missing:
        raise PipelineError(f"{path} is not a CIFAR-10 python archive: {missing[0]} is missing")
    return batches


def _check_size(path: Path, member: tarfile.TarInfo) -> None:
    limit = MAX_META_BYTES if member.name == META else MAX_BATCH_BYTES
    if member.size > limit:
        what = "the batches.meta of a CIFAR-10 archive holds at most" if member.name == META else \
            "no member of a CIFAR-10 archive holds more than"
        raise PipelineError(f"{path}: {_short(member.name)} is {member.size:,} bytes; {what} {limit:,}; "
                            "refusing to read it")


def _unpickle(path: Path, archive: tarfile.TarFile, member: tarfile.TarInfo) -> object:
    batch = _short(member.name)
    if not member.isfile():
        kind = "a directory" if member.isdir() else "a link or special file"
        raise PipelineError(f"{path} is not a CIFAR-10 python archive: {batch} is {kind}, not a file")
    data = archive.extractfile(member).read()  # at most _check_size's limit
    where = f"{path}: {batch}"
    try:
        scan(data, where)
        return BatchUnpickler(data, Checks(where, len(data))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError) as error:  # the pickle machinery's and numpy's ways to say "corrupt"
        raise PipelineError(f"{where} is truncated or corrupt ({type(error).__name__}); "
                            "delete the archive and download it again") from None


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


# --- from unpickled batches to arrays ------------------------------------------------------------------------


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
    if len(pixels) > MAX_ROWS:
        raise PipelineError(f"{where} has {len(pixels):,} images, more than the {MAX_ROWS:,} of a CIFAR-10 batch")
    if labels.shape != (len(pixels),):
        raise PipelineError(f"{where} has {len(pixels)} images but labels of shape {labels.shape}")
    _in_range(where, "pixel value", pixels, 255)
    _in_range(where, "label", labels, classes - 1)
    # Each row is 3072 bytes: the red plane, then green, then blue, of a 32x32 image. One copy, C-contiguous.
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8, order="C")
    return images, labels.astype(np.int64)


def _array(where: str, what: str, values: object, high: int) -> np.ndarray:
    """`values` as an array, refused unless it holds integers (a cast would round anything else unseen)."""
    if isinstance(values, list) and all(type(value) is int for value in values):
        values = np.array(values)  # object dtype if one is beyond 64 bits, refused below
    elif not isinstance(values, np.ndarray):  # a list of lists or arrays would be copied as often as it names them
        raise PipelineError(f"{where} has {what} data that is neither an array nor a list of integers")
    array = np.asarray(values)  # a plain ndarray, not _Array
    if array.size and array.dtype.kind not in "ui":
        raise PipelineError(f"{where} has {what}s of type {array.dtype}, not integers 0..{high}")
    return array


def _in_range(where: str, what: str, array: np.ndarray, high: int) -> None:
    # Checked on the raw values: a cast to uint8 would wrap 256 to 0, and a label of 10 would be dropped later.
    if array.size and (array.min() < 0 or array.max() > high):
        first = tuple(np.argwhere((array < 0) | (array > high))[0])
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
