"""Reading CIFAR-10 archives: every way they are pickled, and refusing anything that is not plain data."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools
import struct
import tarfile
import tracemalloc
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, make_project, run

from transfer.cifar10 import (
    MAX_BATCH_BYTES,
    MAX_MEMBERS,
    MAX_TAR_HEADER_BYTES,
    META,
    TEST_BATCH,
    TRAIN_BATCHES,
    Cifar10,
    read_archive,
    write_archive,
)
from transfer.config import CIFAR10_CLASSES
from transfer.errors import PipelineError

SHARED_COPY = ROOT.parent / "shared/datasets/cifar-10-python.tar.gz"
RECONSTRUCT = np.zeros(0).__reduce__()[0]


class Python2Pickler(pickle._Pickler):
    """Pickles the way Python 2 and numpy 1.x wrote the official archive: byte strings (and Python 2's
    `str`, which is bytes) as SHORT_BINSTRING/BINSTRING, arrays rebuilt by numpy.core.multiarray._reconstruct,
    dtypes by numpy.dtype(code, 0, 1)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_as_python2_str(self, obj: bytes | str) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_as_python2_str
    dispatch[str] = save_as_python2_str

    def reducer_override(self, obj: object) -> object:
        # The numpy of 2009 reduced a dtype to numpy.dtype(code, 0, 1); today's writes (code, False, True).
        if isinstance(obj, np.dtype):
            function, (code, _, _), state = obj.__reduce__()
            return function, (code, 0, 1), state
        return NotImplemented

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def python2_dumps(payload: dict) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(payload)
    return buffer.getvalue()


FLAVOURS: dict[str, Callable[[dict], bytes]] = {
    "official (Python 2)": python2_dumps,
    "shared copy (Python 3, protocol 2)": partial(pickle.dumps, protocol=2),
    "Python 3, protocol 4": partial(pickle.dumps, protocol=4),
    "Python 3, protocol 5": partial(pickle.dumps, protocol=5),
}


def random_cifar(train: int = 30, test: int = 10, seed: int = 0) -> Cifar10:
    """Noise images with labels in no particular order, every pixel value from 0 to 255 present."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(train + test, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0], images[1, 0, 0] = (0, 255, 0), (255, 0, 255)
    labels = rng.integers(0, 10, size=train + test)
    return Cifar10(images[:train], labels[:train], images[train:], labels[train:], CIFAR10_CLASSES)


def opcodes(data: bytes) -> list[tuple[str, object]]:
    return [(op.name, arg) for op, arg, _ in pickletools.genops(data)]


def member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as archive:
        return archive.extractfile(name).read()


Member = tuple[tarfile.TarInfo, bytes | None]  # a member's header and its bytes (None: a folder or a link)


def copy_archive(source: Path, target: Path, rewrite: Callable[[tarfile.TarInfo, bytes | None], list[Member]] =
                 lambda info, data: [(info, data)], extra: Sequence[Member] = ()) -> Path:
    """A copy of archive `source` (GNU format), each member replaced by what `rewrite` makes of it, then `extra`."""
    with tarfile.open(source) as old, tarfile.open(target, "w:gz", format=tarfile.GNU_FORMAT) as new:
        members = [(info, old.extractfile(info).read() if info.isfile() else None) for info in old]
        for info, data in [*(copied for member in members for copied in rewrite(*member)), *extra]:
            info.size = len(data or b"")
            new.addfile(info, io.BytesIO(data) if data is not None else None)
    return target


def replace_member(source: Path, target: Path, name: str, data: bytes | None) -> Path:
    """A copy of archive `source` whose member `name` holds `data`, or is a directory if data is None."""
    replacement = tarfile.TarInfo(name)
    if data is None:
        replacement.type = tarfile.DIRTYPE
    return copy_archive(source, target, lambda info, old: [(replacement, data) if info.name == name else (info, old)])


class Touch:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def malicious_batch(marker: Path) -> bytes:
    return pickle.dumps({b"labels": Touch(marker), b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("good") / "cifar-10-python.tar.gz", random_cifar())


# --- every layout reads to the same data ---------------------------------------------------------------------


def test_the_test_archives_are_pickled_as_claimed(tmp_path):
    cifar = random_cifar()
    written = {flavour: member(write_archive(tmp_path / f"{n}.tar.gz", cifar, dumps), TRAIN_BATCHES[0])
               for n, (flavour, dumps) in enumerate(FLAVOURS.items())}
    official, shared, protocol4, protocol5 = (opcodes(data) for data in written.values())
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in official
    assert ("SHORT_BINSTRING", "data") in official and "BINSTRING" in {name for name, _ in official}
    assert not {"BINBYTES", "BINUNICODE", "SHORT_BINBYTES"} & {name for name, _ in official}
    dtype = official.index(("GLOBAL", "numpy dtype"))
    dtype_arguments = [op for op in official[dtype:dtype + 7] if op[0] != "BINPUT"][1:4]
    assert dtype_arguments == [("SHORT_BINSTRING", "u1"), ("BININT1", 0), ("BININT1", 1)]  # numpy.dtype("u1", 0, 1)
    assert ("GLOBAL", "_codecs encode") in shared and ("PROTO", 2) in shared
    assert ("PROTO", 4) in protocol4 and ("PROTO", 5) in protocol5
    assert ("SHORT_BINUNICODE", "_frombuffer") in protocol5  # protocol 5 rebuilds arrays another way


def test_every_pickle_flavour_reads_to_identical_images_labels_and_classes(tmp_path):
    cifar = random_cifar()
    for n, (flavour, dumps) in enumerate(FLAVOURS.items()):
        read = read_archive(write_archive(tmp_path / f"{n}.tar.gz", cifar, dumps))
        # Same order, so every image keeps its own label.
        assert np.array_equal(read.train_images, cifar.train_images), flavour
        assert np.array_equal(read.train_labels, cifar.train_labels), flavour
        assert np.array_equal(read.test_images, cifar.test_images), flavour
        assert np.array_equal(read.test_labels, cifar.test_labels), flavour
        assert read.class_names == CIFAR10_CLASSES, flavour
        assert read.train_images.dtype == np.uint8 and read.train_labels.dtype == np.int64, flavour


def test_reads_an_archive_laid_out_by_hand_as_the_official_one(tmp_path):
    """Not through write_archive: rows of 3,072 bytes, the red plane, then green, then blue, each row by row;
    Python 2 `str` keys; five training batches and a test batch, each image next to its own label."""
    rng = np.random.default_rng(7)
    rows = {name: rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
            for name, count in zip((*TRAIN_BATCHES, TEST_BATCH), (3, 4, 3, 5, 2, 6))}
    labels = {name: rng.integers(0, 10, size=len(data)).tolist() for name, data in rows.items()}
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        members = {name: {"batch_label": "batch", "labels": labels[name], "data": data,
                          "filenames": [f"{n}.png" for n in range(len(data))]} for name, data in rows.items()}
        members[META] = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": 10_000, "num_vis": 3072}
        for name, payload in members.items():
            data = python2_dumps(payload)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    read = read_archive(path)
    as_images = lambda data: data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731  planes -> HWC
    train_rows = np.concatenate([rows[name] for name in TRAIN_BATCHES])
    assert read.train_images.shape == (17, 32, 32, 3) and read.test_images.shape == (6, 32, 32, 3)
    assert read.train_images[0, 0, 1].tolist() == [train_rows[0, 1], train_rows[0, 1025], train_rows[0, 2049]]
    assert np.array_equal(read.train_images, as_images(train_rows))
    assert read.train_labels.tolist() == [label for name in TRAIN_BATCHES for label in labels[name]]
    assert np.array_equal(read.test_images, as_images(rows[TEST_BATCH]))
    assert read.test_labels.tolist() == labels[TEST_BATCH]
    assert read.class_names == CIFAR10_CLASSES


@pytest.mark.skipif(not SHARED_COPY.exists(), reason=f"no shared copy at {SHARED_COPY}")
def test_reads_the_shared_copy():
    cifar = read_archive(SHARED_COPY)
    assert cifar.class_names == CIFAR10_CLASSES
    assert cifar.train_images.shape == (50_000, 32, 32, 3) and cifar.test_images.shape == (10_000, 32, 32, 3)
    assert np.bincount(cifar.train_labels).tolist() == [5_000] * 10
    assert np.bincount(cifar.test_labels).tolist() == [1_000] * 10


# --- archives that are no plain data -------------------------------------------------------------------------


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, good_archive):
    marker = tmp_path / "PWNED"
    pickle.loads(malicious_batch(marker))  # proves the payload works: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TRAIN_BATCHES[1], malicious_batch(marker))
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == (f"{bad}: data_batch_2 refers to {os.system.__module__}.system, "
                                  "which a CIFAR-10 archive never needs; refusing to load it")
    assert not marker.exists()


def test_a_pickle_naming_an_unknown_module_is_refused(tmp_path, good_archive):
    payload = b"\x80\x02cno_such_module\nthing\n)R."
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError, match=f"^{bad}: test_batch refers to no_such_module.thing, which"):
        read_archive(bad)


def test_codecs_encode_makes_nothing_but_latin1_bytes(tmp_path, good_archive):
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(payload) == "nop"  # what plain pickle would make of it
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", META, payload)
    with pytest.raises(PipelineError, match=f"^{bad}: batches.meta is truncated or corrupt \\(UnpicklingError\\)"):
        read_archive(bad)


def test_malicious_archive_is_refused_by_the_pipeline(tmp_path, good_archive):
    marker = tmp_path / "PWNED"
    bad = replace_member(good_archive, tmp_path / "cifar-10-python.tar.gz", TRAIN_BATCHES[0],
                         malicious_batch(marker))
    project = make_project(tmp_path / "p", bad, git=True)
    result = run(["dvc", "repro", "split"], project, check=False)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    stage_end = lines.index("ERROR: failed to reproduce 'split': failed to run: python -m stages.split, exited with 1")
    expected = (f"error: data/cifar-10-python.tar.gz: data_batch_1 refers to {os.system.__module__}.system, "
                "which a CIFAR-10 archive never needs; refusing to load it")
    assert lines[stage_end - 1] == expected, result.stderr  # the stage's last line of stderr
    assert [line for line in lines if line.startswith("error:")] == [expected]
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (project / "PWNED").exists()
    assert not (project / "data/split").exists()


# --- archives with values a cast would hide ------------------------------------------------------------------


def cifar_with(train_images: np.ndarray | None = None, train_labels: np.ndarray | None = None) -> Cifar10:
    cifar = random_cifar()
    return Cifar10(cifar.train_images if train_images is None else train_images,
                   cifar.train_labels if train_labels is None else train_labels,
                   cifar.test_images, cifar.test_labels, cifar.class_names)


def test_a_label_outside_the_classes_is_refused(tmp_path):
    labels = random_cifar().train_labels.copy()
    labels[15] = 10  # 30 images in 5 batches of 6: the fourth image of data_batch_3
    path = write_archive(tmp_path / "a.tar.gz", cifar_with(train_labels=labels))
    with pytest.raises(PipelineError) as refused:
        read_archive(path)
    assert str(refused.value) == f"{path}: data_batch_3 has label 10 (image 3), outside 0..9"


def test_a_negative_label_is_refused(tmp_path):
    labels = random_cifar().train_labels.copy()
    labels[0] = -1
    path = write_archive(tmp_path / "a.tar.gz", cifar_with(train_labels=labels))
    with pytest.raises(PipelineError, match=f"^{path}: data_batch_1 has label -1 \\(image 0\\), outside 0..9$"):
        read_archive(path)


@pytest.mark.parametrize("value", [256, -1])
def test_a_pixel_value_outside_a_byte_is_refused_not_wrapped(tmp_path, value):
    images = random_cifar().train_images.astype(np.int16)
    images[27, 5, 6, 1] = value  # the fourth image of data_batch_5
    path = write_archive(tmp_path / "a.tar.gz", cifar_with(train_images=images))
    with pytest.raises(PipelineError) as refused:
        read_archive(path)
    assert str(refused.value) == f"{path}: data_batch_5 has pixel value {value} (image 3), outside 0..255"


def test_pixel_values_that_are_not_integers_are_refused(tmp_path):
    images = random_cifar().train_images.astype(np.float32) + 0.5
    path = write_archive(tmp_path / "a.tar.gz", cifar_with(train_images=images))
    with pytest.raises(PipelineError) as refused:
        read_archive(path)
    assert str(refused.value) == f"{path}: data_batch_1 has pixels of type float32, not integers 0..255"


def test_wide_integer_pixels_within_a_byte_are_read(tmp_path):
    cifar = random_cifar()
    path = write_archive(tmp_path / "a.tar.gz", cifar_with(train_images=cifar.train_images.astype(np.int64)))
    assert np.array_equal(read_archive(path).train_images, cifar.train_images)


# --- archives that are no CIFAR-10 ---------------------------------------------------------------------------


def test_a_batch_stored_as_a_directory_is_refused(tmp_path, good_archive):
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TRAIN_BATCHES[3], None)
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == f"{bad} is not a CIFAR-10 python archive: data_batch_4 is a directory, not a file"


def test_a_batch_without_labels_is_refused(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError, match=f"^{bad}: test_batch is not a CIFAR-10 batch: it has no b'labels'"):
        read_archive(bad)


def test_a_batch_of_the_wrong_image_size_is_refused(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError, match=f"^{bad}: test_batch has pixel data of shape \\(2, 1024\\), not N x 3072"):
        read_archive(bad)


def test_a_batch_with_fewer_labels_than_images_is_refused(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TRAIN_BATCHES[0], payload)
    with pytest.raises(PipelineError, match=f"^{bad}: data_batch_1 has 2 images but labels of shape \\(1,\\)$"):
        read_archive(bad)


def test_ragged_labels_are_refused(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0, 1], [2]]})
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError, match=f"^{bad}: test_batch has label data that is neither an array nor a list "
                                            "of integers$"):
        read_archive(bad)


def test_meta_without_class_names_is_refused(tmp_path, good_archive):
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", META, pickle.dumps({b"num_vis": 3072}))
    with pytest.raises(PipelineError, match=f"^{bad}: batches.meta has no list of class names"):
        read_archive(bad)


def test_a_truncated_archive_keeps_its_message(tmp_path, good_archive):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good_archive.read_bytes()[:-200])
    with pytest.raises(PipelineError) as refused:
        read_archive(truncated)
    assert str(refused.value) == f"{truncated} is truncated or corrupt (EOFError); delete it and download again"


def test_a_corrupt_pickle_keeps_its_message(tmp_path, good_archive):
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, pickle.dumps({})[:-3])
    with pytest.raises(PipelineError, match=f"^{bad}: test_batch is truncated or corrupt"):
        read_archive(bad)


# --- hard bounds: what a pickle declares costs nothing until the bytes behind it are there --------------------


class Reduce:
    """Pickles as `reduce` says: how a hostile archive calls numpy with arguments of its choosing."""

    def __init__(self, *reduce: object) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple:
        return self.reduce


def peak_while_refused(path: Path, message: str) -> int:
    """Peak bytes Python and numpy allocate while read_archive refuses `path` with exactly `message`."""
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError) as refused:
            read_archive(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert str(refused.value) == message


def test_the_zero_stride_attack_is_refused_before_numpy_allocates(tmp_path, good_archive):
    """The issue's 605-byte archive: 150,000 images declared as a zero-stride array over one byte."""
    huge = Reduce(np.ndarray, ((150_000, 3072), np.dtype(np.uint8), b"\x00", 0, (0, 0)))
    payload = pickle.dumps({b"data": huge, b"labels": [0] * 10}, protocol=2)
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TRAIN_BATCHES[0], payload)
    peak = peak_while_refused(bad, f"{bad}: data_batch_1 calls numpy.ndarray directly, which a CIFAR-10 archive "
                                   "never does; refusing to load it")
    assert peak < 8 << 20  # what reading the good members takes; the declared array is 440 MiB


@pytest.mark.parametrize("shape", [(1 << 40,), (2, 3072), (-1, 3072)])
def test_a_shape_its_bytes_do_not_fill_is_refused(tmp_path, good_archive, shape):
    huge = Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, np.dtype(np.uint8), False, b"\x00" * 3072))
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH,
                         pickle.dumps({b"data": huge, b"labels": [0]}, protocol=2))
    message = (f"{bad}: test_batch declares an array of shape {shape} and type uint8 that its 3,072 bytes do "
               "not fill; refusing to load it")
    if shape[0] < 0:
        message = (f"{bad}: test_batch holds an array of shape {shape}; a CIFAR-10 batch holds 1 or 2 dimensions; "
                   "refusing to load it")  # a negative dimension is no dimension
    assert peak_while_refused(bad, message) < 8 << 20


def test_an_object_array_is_refused_before_it_is_built(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.array([[b"x"] * 3072], dtype=object), b"labels": [0]}, protocol=2)
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == (f"{bad}: test_batch holds an array of type 'O8'; a CIFAR-10 batch holds numbers "
                                  "(no objects, records or strings); refusing to load it")


def test_a_fortran_order_batch_is_refused(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.asfortranarray(np.zeros((2, 3072), np.uint8)), b"labels": [0, 1]})
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError, match=f"^{bad}: test_batch holds an array that is not C-contiguous; refusing"):
        read_archive(bad)


def test_a_batch_of_more_than_10000_images_is_refused(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((10_001, 3072), np.uint8), b"labels": [0] * 10_001}, protocol=4)
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TRAIN_BATCHES[4], payload)
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == f"{bad}: data_batch_5 has 10,001 images, more than the 10,000 of a CIFAR-10 batch"


@pytest.mark.parametrize(("name", "size", "limit"), [(TRAIN_BATCHES[2], 1 << 40, "no member of a CIFAR-10 archive "
                                                      "holds more than 67,108,864"),
                                                     (META, 20_000, "the batches.meta of a CIFAR-10 archive holds "
                                                      "at most 16,384")])
def test_a_member_larger_than_an_official_one_is_refused_by_its_header(tmp_path, name, size, limit):
    """Only the header is there: the size is refused before a byte of the member is read."""
    info = tarfile.TarInfo(name)
    info.size = size
    bad = tmp_path / "bad.tar.gz"
    with gzip.open(bad, "wb") as stream:
        stream.write(info.tobuf(format=tarfile.GNU_FORMAT))
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == f"{bad}: {name.rsplit('/', 1)[-1]} is {size:,} bytes; {limit}; refusing to read it"


@pytest.mark.parametrize(("payload", "why"), [
    (b"\x80\x02K\x00r\x00\x00\x00\x40.", "is truncated or corrupt (UnpicklingError)"),  # memo index 2**30: 16 GiB
    (b"\x80\x02" + b"(" * 100_000 + b")" + b"t" * 100_000 + b".", "nests tuples more than 16 deep"),
    (b"\x80\x02]\x8f.", "uses the pickle opcode EMPTY_SET"),
])
def test_pickles_that_ask_for_memory_or_stack_are_refused_before_they_run(tmp_path, good_archive, payload, why):
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    peak = peak_while_refused(bad, f"{bad}: test_batch {why}" + (
        "; delete the archive and download it again" if "corrupt" in why else
        ", which a CIFAR-10 archive never needs; refusing to load it"))
    assert peak < 8 << 20


def test_a_sparse_member_is_refused(tmp_path):
    """tarfile reads a sparse member's map for as long as its blocks say it goes on (here: past the end, which
    escaped as an IndexError)."""
    info = tarfile.TarInfo(TRAIN_BATCHES[0])
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[482] = 1  # "the sparse map goes on in the next block"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)  # the checksum
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == (f"{bad} has a sparse member ({TRAIN_BATCHES[0]}), which a CIFAR-10 archive never "
                                  "has; refusing it")


def test_write_archive_lays_out_its_members_as_the_official_archive(tmp_path):
    """The keys and values of the official batches (read_archive ignores all but data, labels, label_names)."""
    cifar = random_cifar(train=10, test=3)
    path = write_archive(tmp_path / "a.tar.gz", cifar)
    with tarfile.open(path) as archive:
        assert archive.getnames() == [*TRAIN_BATCHES, TEST_BATCH, META]
    test = pickle.loads(member(path, TEST_BATCH))  # our own file: safe to unpickle
    assert set(test) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert test[b"batch_label"] == b"testing batch 1 of 1" and test[b"filenames"] == [b"0.png", b"1.png", b"2.png"]
    assert test[b"labels"] == [int(label) for label in cifar.test_labels] and test[b"data"].shape == (3, 3072)
    red = cifar.test_images[1, :, :, 0].reshape(-1)  # a row holds the red plane, then the green, then the blue
    np.testing.assert_array_equal(test[b"data"][1, :1024], red)
    assert pickle.loads(member(path, TRAIN_BATCHES[0]))[b"data"].shape == (2, 3072)
    assert pickle.loads(member(path, META)) == {b"label_names": [name.encode() for name in CIFAR10_CLASSES],
                                                b"num_cases_per_batch": 2, b"num_vis": 3072}
    read = read_archive(path)
    np.testing.assert_array_equal(read.test_images, cifar.test_images)
    assert read.test_images.flags.c_contiguous  # one C-order copy of the transposed planes


def test_frombuffer_only_rebuilds_a_c_order_array_of_bytes(tmp_path, good_archive):
    frombuffer = np.zeros(3).__reduce_ex__(5)[0]  # numpy's _frombuffer, as protocol 5 names it
    for buffer, order in ((b"\x00" * 3072, "F"), (bytearray(3072), "F"), ("text", "C")):
        array = Reduce(frombuffer, (buffer, np.dtype(np.uint8), (1, 3072), order))
        payload = pickle.dumps({b"data": array, b"labels": [0]}, protocol=5)
        bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
        with pytest.raises(PipelineError) as refused:
            read_archive(bad)
        assert str(refused.value) == (f"{bad}: test_batch is truncated or corrupt (UnpicklingError); delete the "
                                      "archive and download it again"), (buffer, order)
    array = Reduce(frombuffer, (bytearray(3072), np.dtype(np.uint8), (1, 3072), "C"))
    fine = replace_member(good_archive, tmp_path / "fine.tar.gz", TEST_BATCH,
                          pickle.dumps({b"data": array, b"labels": [0]}, protocol=5))
    assert read_archive(fine).test_images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("digits", [(25, 25, 24), (25, 25, 25)])
def test_a_long_shape_is_shown_up_to_80_characters(tmp_path, good_archive, digits):
    shape = tuple(10 ** (n - 1) for n in digits)  # its repr: 80 characters, then 81
    huge = Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, np.dtype(np.uint8), False, b"\x00" * 3072))
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH,
                         pickle.dumps({b"data": huge, b"labels": [0]}, protocol=2))
    shown = repr(shape) if len(repr(shape)) <= 80 else repr(shape)[:77] + "..."
    assert len(repr(shape)) == sum(digits) + 6 and len(shown) == 80
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == (f"{bad}: test_batch holds an array of shape {shown}; a CIFAR-10 batch holds 1 or 2 "
                                  "dimensions; refusing to load it")


def test_labels_that_are_not_integers_are_refused_naming_the_range(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": np.array([0.5])}, protocol=4)
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", TEST_BATCH, payload)
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == f"{bad}: test_batch has labels of type float64, not integers 0..9"


def test_a_batch_of_exactly_10000_images_is_read(tmp_path, good_archive):
    payload = pickle.dumps({b"data": np.zeros((10_000, 3072), np.uint8), b"labels": [9] * 10_000}, protocol=4)
    fine = replace_member(good_archive, tmp_path / "fine.tar.gz", TEST_BATCH, payload)
    assert read_archive(fine).test_labels.tolist() == [9] * 10_000


def test_big_endian_pixels_are_read_by_their_byte_order(tmp_path):
    cifar = random_cifar()
    path = write_archive(tmp_path / "a.tar.gz", cifar_with(train_images=cifar.train_images.astype(">u2")))
    assert np.array_equal(read_archive(path).train_images, cifar.train_images)


@pytest.mark.parametrize(("meta", "why"), [
    ([b"airplane"] * 10, "has no list of class names under b'label_names'"),
    ({b"label_names": ["airplane"] * 10}, "has no list of class names under b'label_names'"),
    ({b"label_names": [b"\xff"] * 10}, "has a class name that is not UTF-8"),
    ({b"label_names": tuple(name.encode() for name in CIFAR10_CLASSES)}, "has no list of class names under "
     "b'label_names'"),  # a tuple of the right names: still no list
])
def test_class_names_that_are_no_list_of_utf8_bytes_are_refused(tmp_path, good_archive, meta, why):
    bad = replace_member(good_archive, tmp_path / "bad.tar.gz", META, pickle.dumps(meta, protocol=2))
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == f"{bad}: batches.meta {why}"


# --- the tar layer's bounds, each at its edge, and the messages that name what is wrong ------------------------


def with_extra_members(source: Path, target: Path, extra: Sequence[Member]) -> Path:
    return copy_archive(source, target, extra=extra)


def extra_file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def members_in(path: Path) -> int:
    with tarfile.open(path) as archive:
        return len(archive.getmembers())


def test_an_archive_of_64_members_is_read_and_one_of_65_refused(tmp_path, good_archive):
    official = members_in(good_archive)
    fits = with_extra_members(good_archive, tmp_path / "fits.tar.gz",
                              [extra_file(f"cifar-10-batches-py/extra_{i}") for i in range(MAX_MEMBERS - official)])
    assert members_in(fits) == MAX_MEMBERS
    assert read_archive(fits).class_names == CIFAR10_CLASSES
    over = with_extra_members(good_archive, tmp_path / "over.tar.gz", [
        extra_file(f"cifar-10-batches-py/extra_{i}") for i in range(MAX_MEMBERS + 1 - official)])
    with pytest.raises(PipelineError) as refused:
        read_archive(over)
    assert str(refused.value) == f"{over} has more than 64 members (the official one has 9); refusing it"


def test_a_long_name_header_of_64_kib_is_read_and_one_byte_more_refused(tmp_path, good_archive):
    """A GNU long name is a header member of the name's bytes and a NUL: tarfile reads it whole."""
    fits = with_extra_members(good_archive, tmp_path / "fits.tar.gz",
                              [extra_file("n" * (MAX_TAR_HEADER_BYTES - 1))])
    assert read_archive(fits).class_names == CIFAR10_CLASSES
    over = with_extra_members(good_archive, tmp_path / "over.tar.gz", [extra_file("n" * MAX_TAR_HEADER_BYTES)])
    with pytest.raises(PipelineError) as refused:
        read_archive(over)
    assert str(refused.value) == (f"{over} has a tar header of 65,537 bytes, more than the 65,536 a CIFAR-10 "
                                  "archive needs; refusing to read it")


def test_a_member_of_exactly_the_limit_is_not_refused_by_its_size(tmp_path, good_archive):
    """An extra member as big as a batch may be (64 MiB of zeros: 64 KiB compressed) is skipped, not refused."""
    fits = with_extra_members(good_archive, tmp_path / "fits.tar.gz",
                              [extra_file("cifar-10-batches-py/big", bytes(MAX_BATCH_BYTES))])
    assert read_archive(fits).class_names == CIFAR10_CLASSES


def test_a_batch_twice_is_refused_naming_it(tmp_path, good_archive):
    twice = with_extra_members(good_archive, tmp_path / "twice.tar.gz",
                               [extra_file(TRAIN_BATCHES[1], member(good_archive, TRAIN_BATCHES[1]))])
    with pytest.raises(PipelineError) as refused:
        read_archive(twice)
    assert str(refused.value) == f"{twice}: data_batch_2 appears twice; refusing the archive"


@pytest.mark.parametrize("name", ["cifar-10-batches-py/extra/deeper/big.bin", "big.bin"])
def test_an_oversized_member_in_any_folder_is_named_by_its_file_name(tmp_path, name):
    info = tarfile.TarInfo(name)
    info.size = MAX_BATCH_BYTES + 1
    bad = tmp_path / "bad.tar.gz"
    with gzip.open(bad, "wb") as stream:
        stream.write(info.tobuf(format=tarfile.GNU_FORMAT))
    with pytest.raises(PipelineError) as refused:
        read_archive(bad)
    assert str(refused.value) == (f"{bad}: big.bin is 67,108,865 bytes; no member of a CIFAR-10 archive holds more "
                                  "than 67,108,864; refusing to read it")


def test_a_missing_archive_says_to_run_the_download_stage(tmp_path):
    with pytest.raises(PipelineError) as refused:
        read_archive(tmp_path / "nowhere.tar.gz")
    assert str(refused.value) == f"{tmp_path / 'nowhere.tar.gz'} not found: run the download stage (dvc repro)"


def test_an_archive_without_a_batch_names_it(tmp_path, good_archive):
    lacking = copy_archive(good_archive, tmp_path / "lacking.tar.gz",
                           lambda info, data: [] if info.name == TRAIN_BATCHES[2] else [(info, data)])
    with pytest.raises(PipelineError) as refused:
        read_archive(lacking)
    assert str(refused.value) == (f"{lacking} is not a CIFAR-10 python archive: cifar-10-batches-py/data_batch_3 "
                                  "is missing")


def test_a_batch_that_is_a_link_is_refused(tmp_path, good_archive):
    link = tarfile.TarInfo(TRAIN_BATCHES[0])
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    linked = copy_archive(good_archive, tmp_path / "linked.tar.gz",
                          lambda info, data: [(link, None) if info.name == link.name else (info, data)])
    with pytest.raises(PipelineError) as refused:
        read_archive(linked)
    assert str(refused.value) == (f"{linked} is not a CIFAR-10 python archive: data_batch_1 is a link or special "
                                  "file, not a file")
