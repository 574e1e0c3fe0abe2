"""Fuzzing the archive reader: thousands of damaged and hostile archives, each read correctly or refused with one
line, none taking more than MEMORY_LIMIT of address space or SECONDS_LIMIT of CPU time.

Hypothesis generates them from three sources: byte-level damage to real archives of every pickle flavour (in a
member's pickle, in the tar stream with its headers, in the gzip file), arrays built from numpy's own pickle globals
with hostile arguments (huge or negative shapes, zero strides, object and record dtypes, buffers that do not fill
them), and programs of the very pickle opcodes the reader accepts. Derandomized, so CI sees the same examples on
every run.
"""

from __future__ import annotations

import functools
import gzip
import io
import pickle
import resource
import struct
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cifar10 import FLAVOURS, random_cifar

from transfer.cifar10 import REQUIRED, TEST_BATCH, TRAIN_BATCHES, read_archive, write_archive
from transfer.errors import PipelineError

MEMORY_LIMIT = 256 << 20  # address space one read may add (RLIMIT_AS: beyond it, MemoryError); a valid one needs ~2 MiB
SECONDS_LIMIT = 1.0
RECONSTRUCT = np.zeros(0).__reduce__()[0]
FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]


def fuzz(examples: int) -> settings:
    # derandomize: the same examples on every run, so CI is stable; no database of failures to replay either.
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# --- the archive being fuzzed, and the check every example must pass ---------------------------------------------


@functools.cache
def originals() -> dict[str, list[tuple[str, bytes]]]:
    """Each pickle flavour's tiny valid archive, as (member name, pickle) pairs in archive order. (Not a fixture:
    Hypothesis would print all of it with every failing example.)"""
    members = {}
    with tempfile.TemporaryDirectory() as folder:
        for n, (flavour, dumps) in enumerate(FLAVOURS.items()):
            path = write_archive(Path(folder) / f"{n}.tar.gz", random_cifar(train=5, test=2), dumps)
            with tarfile.open(path) as archive:
                members[flavour] = [(info.name, archive.extractfile(info).read()) for info in archive]
    return members


def compress(stream: bytes) -> bytes:
    return gzip.compress(stream, compresslevel=1, mtime=0)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@contextmanager
def memory_limit(extra: int):
    """Allocations beyond `extra` bytes more than the process has now raise MemoryError. (tracemalloc would
    measure the peak, but makes each read ten times slower.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def check(tmp_path):
    """check(gzip bytes): read them as an archive; the read must succeed or be one PipelineError line, in bounds."""
    path = tmp_path / "cifar-10-python.tar.gz"
    outcomes = {"read": 0, "refused": 0}

    def read(archive: bytes) -> None:
        path.write_bytes(archive)
        start = time.process_time()  # CPU seconds: the machine running the tests may be busy
        try:
            with memory_limit(MEMORY_LIMIT):
                cifar = read_archive(path)
        except PipelineError as error:
            message = str(error)
            assert message.startswith(str(path)) and "\n" not in message and len(message) < 400, message
            outcomes["refused"] += 1
        else:
            for images, labels in ((cifar.train_images, cifar.train_labels), (cifar.test_images, cifar.test_labels)):
                assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and images.flags.c_contiguous
                assert labels.dtype == np.int64 and labels.shape == (len(images),)
                assert labels.size == 0 or 0 <= labels.min() <= labels.max() < len(cifar.class_names)
            outcomes["read"] += 1
        seconds = time.process_time() - start
        assert seconds < SECONDS_LIMIT, f"{seconds:.2f} s"

    yield read
    print(outcomes)


# --- 1. byte-level damage to real archives ------------------------------------------------------------------------

flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=8)


@fuzz(1000)
@given(data=st.data())
def test_damaged_archives(check, data):
    members = list(originals()[data.draw(st.sampled_from(sorted(originals())))])
    where = data.draw(st.sampled_from(["pickle cut", "pickle flips", "tar cut", "tar flips", "gzip cut",
                                       "gzip flips"]))
    if where.startswith("pickle"):
        index = data.draw(st.integers(0, len(members) - 1))
        name, pickled = members[index]
        if where == "pickle cut":
            pickled = pickled[:data.draw(st.integers(0, max(len(pickled) - 1, 0)))]
        else:
            pickled = flip(pickled, data.draw(flips))
        members[index] = (name, pickled)
    stream = tar_bytes(members)
    if where == "tar cut":
        stream = stream[:data.draw(st.integers(0, len(stream)))]
    elif where == "tar flips":
        # Mostly the headers: the first 512 bytes of each member say its name, type and size.
        header = data.draw(st.sampled_from([offset for offset in range(0, len(stream), 512)]))
        stream = flip(stream, [(header + position % 512, xor) for position, xor in data.draw(flips)])
    archive = compress(stream)
    if where == "gzip cut":
        archive = archive[:data.draw(st.integers(0, len(archive)))]
    elif where == "gzip flips":
        archive = flip(archive, data.draw(flips))
    check(archive)


def flip(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    changed = bytearray(data)
    for position, xor in changes:
        if changed:
            changed[position % len(changed)] ^= xor
    return bytes(changed)


# --- 2. arrays from numpy's own globals, with hostile arguments ----------------------------------------------------


class Reduce:
    """Pickles as `reduce` says, the way numpy's arrays pickle themselves."""

    def __init__(self, *reduce: object) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple:
        return self.reduce


dimension = st.sampled_from([0, 1, 2, 3, 3072, 10_000, 10_001, 150_000, 1 << 31, 1 << 40, 1 << 64, -1])
shapes = st.one_of(st.tuples(), st.tuples(dimension), st.tuples(dimension, dimension),
                   st.tuples(dimension, dimension, dimension), st.lists(dimension, max_size=2).map(tuple),
                   st.just([2, 3072]), st.just(None))
dtypes = st.sampled_from([np.uint8, np.int64, ">i2", np.float32, bool, object, "V8", "S3", "<U2",
                          [("a", "u1"), ("b", object)], ("u1", (1000,)), "M8[s]", np.complex64])
buffers = st.one_of(st.binary(max_size=40), st.sampled_from([b"x", b"\x00" * 3072, b"\x01" * 6144]))
strides = st.one_of(st.none(), st.tuples(st.sampled_from([0, 1, -1, 3, 3072, 1 << 40])),
                    st.tuples(st.sampled_from([0, 3072, -3072, 7]), st.sampled_from([0, 1, -1, 2])))


@st.composite
def hostile_array(draw) -> object:
    kind = draw(st.sampled_from(["ndarray call", "reconstruct", "frombuffer", "valid"]))
    shape, dtype, buffer = draw(shapes), np.dtype(draw(dtypes)), draw(buffers)
    if kind == "ndarray call":  # the zero-stride attack: any shape over one byte
        return Reduce(np.ndarray, (shape, dtype, buffer, draw(st.sampled_from([0, 1, -1])), draw(strides)))
    if kind == "reconstruct":
        fortran = draw(st.booleans())
        state = (1, shape, dtype, fortran, [1, 2] if dtype.hasobject else buffer)
        return Reduce(RECONSTRUCT, (np.ndarray, draw(st.sampled_from([(0,), shape])), b"b"), state)
    if kind == "frombuffer":
        return Reduce(FROMBUFFER, (bytearray(buffer), dtype, shape, draw(st.sampled_from(["C", "F", "K"]))))
    rows = draw(st.integers(0, 3))
    return np.zeros((rows, draw(st.sampled_from([3072, 1024]))), draw(st.sampled_from([np.uint8, np.int64])))


@fuzz(600)
@given(data=st.data())
def test_hostile_arrays(check, data):
    flavour = data.draw(st.sampled_from(sorted(originals())))
    batch = {b"data": data.draw(hostile_array()),
             b"labels": data.draw(st.one_of(hostile_array(), st.lists(st.integers(-2, 12), max_size=4)))}
    protocol = data.draw(st.sampled_from([2, 5]))
    try:
        pickled = pickle.dumps(batch, protocol=protocol)
    except (TypeError, ValueError, pickle.PicklingError):
        return  # not every combination pickles
    members = dict(originals()[flavour])
    members[data.draw(st.sampled_from([*TRAIN_BATCHES, TEST_BATCH]))] = pickled
    check(compress(tar_bytes(list(members.items()))))


# --- 3. programs of the opcodes the reader accepts ---------------------------------------------------------------

GLOBALS = [b"numpy\nndarray", b"numpy\ndtype", b"numpy.core.multiarray\n_reconstruct", b"numpy._core.numeric\n"
           b"_frombuffer", b"_codecs\nencode", b"numpy._core.multiarray\nndarray", b"builtins\neval", b"os\nsystem"]
NUMBERS = [0, 1, 2, 3, 255, 3072, 10_000, 150_000, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 63, -1]
SNIPPETS = [  # pieces of real numpy pickles, so that programs reach the checks behind the first REDUCE
    b"cnumpy\ndtype\nU\x02u1\x89\x88\x87R", b"cnumpy\ndtype\nU\x02O8\x89\x88\x87R",
    b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
    b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R",
    b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00latin1\x86R",
    b"U\x04data", b"U\x06labels", b"\x89", b"\x88",
]


@st.composite
def opcode(draw) -> bytes:
    kind = draw(st.sampled_from(["bare", "global", "int", "string", "memo", "frame", "text", "snippet"]))
    if kind == "bare":
        return draw(st.sampled_from([b"(", b"t", b"\x85", b"\x86", b"\x87", b")", b"]", b"}", b"l", b"d", b"a",
                                     b"e", b"s", b"u", b"R", b"b", b"0", b"1", b"2", b"N", b"\x94", b"\x93"]))
    if kind == "global":
        return b"c" + draw(st.sampled_from(GLOBALS)) + b"\n"
    if kind == "int":
        number = draw(st.sampled_from(NUMBERS))
        if 0 <= number < 256:
            return b"K" + bytes([number])
        if -(1 << 31) <= number < 1 << 31:
            return b"J" + struct.pack("<i", number)
        encoded = pickle.encode_long(number)
        return b"\x8a" + bytes([len(encoded)]) + encoded
    if kind == "string":
        text = draw(st.binary(max_size=12))
        declared = draw(st.sampled_from([len(text), len(text) + 1, 1 << 31, (1 << 32) - 1]))
        code = draw(st.sampled_from([b"T", b"X", b"B", b"\x8e", b"\x96", b"U", b"C", b"\x8c"]))
        if code in (b"U", b"C", b"\x8c"):
            return code + bytes([min(declared, 255)]) + text
        width = 8 if code in (b"\x8e", b"\x96") else 4
        return code + declared.to_bytes(width, "little") + text
    if kind == "memo":
        index = draw(st.sampled_from([0, 1, 2, 5, 255, 1 << 20, (1 << 32) - 1]))
        code = draw(st.sampled_from([b"q", b"h", b"r", b"j"]))
        return code + (bytes([index % 256]) if code in (b"q", b"h") else index.to_bytes(4, "little"))
    if kind == "frame":
        return b"\x95" + draw(st.sampled_from([0, 9, 1 << 40])).to_bytes(8, "little")
    if kind == "text":
        return draw(st.sampled_from([b"I", b"p", b"g", b"L"])) + str(draw(st.sampled_from(NUMBERS))).encode() + b"\n"
    return draw(st.sampled_from(SNIPPETS))


@fuzz(800)
@given(data=st.data())
def test_programs_of_accepted_opcodes(check, data):
    program = b"".join(data.draw(st.lists(opcode(), max_size=40)))
    repeat = data.draw(st.sampled_from([1, 1, 1, 2000]))  # a long program: memo and stack growth, many opcodes
    protocol = data.draw(st.sampled_from([b"\x80\x02", b"\x80\x05", b""]))
    members = dict(originals()[data.draw(st.sampled_from(sorted(originals())))])
    members[data.draw(st.sampled_from(REQUIRED))] = protocol + program * repeat + b"."
    check(compress(tar_bytes(list(members.items()))))
