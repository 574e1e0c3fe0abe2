"""The official CIFAR-10 "python version" archive: checking, reading and writing it.

The batches are pickles, and a pickle can run any code it names and ask for any amount of memory. An archive
is data, so it is read within hard bounds, each checked before the memory it guards is taken:
- each tar member and header is no larger than an official one can be, checked in its header before reading;
- each pickle is scanned before it is unpickled: only opcodes that build plain data, a bounded number of them,
  tuples nested a few deep (hashing deeper ones overflows the C stack), and memo indices that do not make the
  C unpickler allocate room for indices never used (a 10-byte pickle could otherwise take gigabytes);
- the only globals are numpy's array rebuilders and `_codecs.encode`, each replaced by a function that checks
  its arguments (integer or float types, C order, a shape that the bytes it is given fill exactly) and counts
  what it builds against twice the member's size, before numpy or the codec allocates anything.
So reading takes a small multiple of the members' total size (64 MiB a batch at most), whatever the pickles
declare.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from transfer.errors import PipelineError

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
MAX_OPCODES = 250_000  # the shared copy's batches hold 90,152 each
MAX_TUPLE_DEPTH = 16  # numpy's pickles nest tuples 2 deep
DTYPES = frozenset({"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"})


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
        _scan(data, where)
        return _BatchUnpickler(data, _Checks(where, len(data))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError) as error:  # the pickle machinery's and numpy's ways to say "corrupt"
        raise PipelineError(f"{where} is truncated or corrupt ({type(error).__name__}); "
                            "delete the archive and download it again") from None


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


# --- the pickle layer: a scan of the opcodes, then the C unpickler with checked globals -------------------------

# Everything but what makes objects of classes (INST, OBJ, NEWOBJ*), sets, extensions and persistent or
# out-of-band references, which no CIFAR-10 pickle holds.
_REFUSED = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "EMPTY_SET", "ADDITEMS", "FROZENSET",
            "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
_OPCODES = {op.code.encode("latin1")[0]: op for op in pickletools.opcodes}
_PUSH = {"NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
         "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
         "BYTEARRAY8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "EMPTY_LIST", "EMPTY_DICT",
         "GLOBAL"}
_TUPLES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_POP = {"APPEND": 1, "SETITEM": 2, "BUILD": 1, "REDUCE": 1, "STACK_GLOBAL": 1}
_LENGTH = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
           pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}


def _scan(data: bytes, where: str) -> None:
    """Follow the unpickler's stack, tracking only how deep each tuple on it nests, and refuse before it runs."""
    stack: list[int] = []  # per stack item: depth of tuple nesting (0 for anything but a tuple)
    marks: list[int] = []
    memo: dict[int, int] = {}
    position = 0
    for count in range(MAX_OPCODES):
        if position >= len(data):
            raise pickle.UnpicklingError("pickle data was truncated")
        op = _OPCODES.get(data[position])
        if op is None:
            raise pickle.UnpicklingError(f"unknown opcode {data[position]:#x}")
        if op.name in _REFUSED:
            raise PipelineError(f"{where} uses the pickle opcode {op.name}, which a CIFAR-10 archive never "
                                "needs; refusing to load it")
        argument, position = _argument(data, position + 1, op)
        name, fence = op.name, marks[-1] if marks else 0
        if name in _PUSH:
            stack.append(0)
        elif name in _TUPLES:
            start = len(stack) - _TUPLES[name]
            if start < fence:
                raise pickle.UnpicklingError(f"{name} without the items it needs")
            _push_tuple(stack, start, where)
        elif name in ("TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS", "POP_MARK"):
            start = marks.pop() if marks else -1
            if start < 0 or (name in ("APPENDS", "SETITEMS") and start <= (marks[-1] if marks else 0)):
                raise pickle.UnpicklingError(f"{name} without the items it needs")
            if name == "TUPLE":
                _push_tuple(stack, start, where)
            else:
                del stack[start:]
                if name in ("LIST", "DICT"):
                    stack.append(0)
        elif name in _POP:  # they need one item more than they pop: the list, dict, object or callable
            if len(stack) - fence <= _POP[name]:
                raise pickle.UnpicklingError(f"{name} without the items it needs")
            del stack[len(stack) - _POP[name]:]
            if name in ("REDUCE", "STACK_GLOBAL"):
                stack[-1] = 0
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "POP":
            if marks and marks[-1] == len(stack):
                marks.pop()  # as the C unpickler does
            elif len(stack) > fence:
                stack.pop()
            else:
                raise pickle.UnpicklingError("POP on an empty stack")
        elif name == "DUP":
            if len(stack) <= fence:
                raise pickle.UnpicklingError("DUP on an empty stack")
            stack.append(stack[-1])
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if argument not in memo:
                raise pickle.UnpicklingError(f"memo index {argument} was never set")
            stack.append(memo[argument])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else argument
            # The C unpickler grows its memo to twice the highest index: a pickle's indices count its objects.
            if len(stack) <= fence or index > count:
                raise pickle.UnpicklingError(f"memo index {index} at opcode {count}")
            memo[index] = stack[-1]
        elif name == "FRAME":
            if argument > len(data) - position:
                raise pickle.UnpicklingError("frame larger than the data")
        elif name == "STOP":
            return
    raise PipelineError(f"{where} holds more than {MAX_OPCODES:,} pickle opcodes, more than a CIFAR-10 batch "
                        "needs; refusing to load it")


def _push_tuple(stack: list[int], start: int, where: str) -> None:
    depth = 1 + max(stack[start:], default=0)
    if depth > MAX_TUPLE_DEPTH:
        raise PipelineError(f"{where} nests tuples more than {MAX_TUPLE_DEPTH} deep, which a CIFAR-10 archive "
                            "never needs; refusing to load it")
    del stack[start:]
    stack.append(depth)


def _argument(data: bytes, position: int, op: pickletools.OpcodeInfo) -> tuple[int | None, int]:
    """(the argument as an integer when a memo index or frame size needs it, the position after the argument);
    a truncated one is an UnpicklingError."""
    width = op.arg.n if op.arg else 0
    value = None
    if width == pickletools.UP_TO_NEWLINE:
        for _ in range(2 if op.name == "GLOBAL" else 1):
            end = data.find(b"\n", position)
            if end < 0:
                raise pickle.UnpicklingError(f"{op.name} without its newline")
            line, position = data[position:end], end + 1
        if op.name in ("GET", "PUT"):
            value = int(line)
    elif width in _LENGTH:
        size, signed = _LENGTH[width]
        length = int.from_bytes(data[position:position + size], "little", signed=signed)
        position += size + length
        if length < 0 or position > len(data):
            raise pickle.UnpicklingError(f"{op.name} longer than the data")
    else:
        value = int.from_bytes(data[position:position + width], "little")
        position += width
    if position > len(data):
        raise pickle.UnpicklingError(f"{op.name} truncated")
    return value, position


class _Dtype:
    """What numpy.dtype(code, align, copy) stands for while unpickling: only a type code and a byte order, which
    become a numpy dtype when an array is built, so no pickled state ever reaches numpy's dtype.__setstate__."""

    def __init__(self, code: str) -> None:
        self.code, self.order = code, "="

    def __setstate__(self, state: object) -> None:
        # numpy pickles a plain dtype's state as (3, byte order, None, None, None, -1, -1, 0).
        order = state[1] if isinstance(state, tuple) and len(state) == 8 else None
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if order not in ("<", ">", "|", "=") or state[2:] != (None, None, None, -1, -1, 0):
            raise pickle.UnpicklingError("a dtype state that is not a plain number type's")
        self.order = order

    def numpy(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order) if self.order in "<>" else np.dtype(self.code)


class _Array(np.ndarray):
    """The empty array numpy's _reconstruct makes, whose __setstate__ checks the state before numpy sees it."""

    def __setstate__(self, state: object) -> None:
        np.ndarray.__setstate__(self, self.checks.array_state(state))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles one scanned batch; only the globals of _Checks resolve."""

    def __init__(self, data: bytes, checks: _Checks) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")  # Python 2 `str`s become bytes, as the batch keys are
        self.checks = checks

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.checks.allowed:
            self.checks.refuse(f"refers to {module}.{name}, which a CIFAR-10 archive never needs")
        return self.checks.allowed[module, name]


class _Global:
    """An allowed global as a pickle sees it: it can call it, but BUILD can set nothing on it (a bound method would
    give BUILD its function's __dict__, which every later read shares)."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., object]) -> None:
        object.__setattr__(self, "_function", function)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise pickle.UnpicklingError(f"BUILD on a global (setting {name!r})")

    def __call__(self, *args: object) -> object:
        return self._function(*args)


class _Checks:
    """The globals a batch may use, as functions that check what they are asked to build, for one member.

    numpy.ndarray is only an argument of _reconstruct, never called: called, it makes arrays of any shape and
    strides over any buffer. (Arrays keep this object, not the unpickler, which holds the pickle and its memo.)
    """

    def __init__(self, where: str, size: int) -> None:
        self.where, self.size, self.budget = where, size, 2 * size
        self.ndarray, dtype = _Global(self._ndarray_called), _Global(self.dtype)
        self.allowed = {("numpy", "ndarray"): self.ndarray, ("numpy", "dtype"): dtype,
                        ("_codecs", "encode"): _Global(self.latin1_bytes)}
        # Whatever module a pickle names them by: numpy.core in Python 2 and numpy 1.x, numpy._core in numpy 2.
        reconstruct, frombuffer = _Global(self.reconstruct), _Global(self.frombuffer)
        for package in ("numpy.core", "numpy._core"):
            self.allowed |= {(f"{package}.multiarray", "_reconstruct"): reconstruct,
                             (f"{package}.multiarray", "ndarray"): self.ndarray,
                             (f"{package}.multiarray", "dtype"): dtype,
                             (f"{package}.numeric", "_frombuffer"): frombuffer}

    def refuse(self, why: str) -> NoReturn:
        raise PipelineError(f"{self.where} {why}; refusing to load it")

    def spend(self, size: int) -> None:
        # Arrays and byte strings are built from bytes the member holds, once as text or bytes, once as an array;
        # a pickle that reuses them (memo) to build more is refused before it builds it.
        if size > self.budget:
            self.refuse(f"builds more arrays and byte strings than twice its own {self.size:,} bytes hold")
        self.budget -= size

    def latin1_bytes(self, text: object, encoding: object) -> bytes:
        # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); other codecs are no byte string.
        if not isinstance(text, str) or encoding != "latin1":
            raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
        self.spend(len(text))
        return text.encode("latin1")

    def dtype(self, code: object, align: object = False, copy: object = True) -> _Dtype:
        # numpy pickles numpy.dtype(code, False, True); the numpy of the official archive wrote (code, 0, 1).
        code = code.decode("latin1") if isinstance(code, bytes) else code
        if code not in DTYPES or not all(type(flag) in (bool, int) and flag in (0, 1) for flag in (align, copy)):
            self.refuse(f"holds an array of type {code!r}; a CIFAR-10 batch holds numbers (no objects, records "
                        "or strings)")
        return _Dtype(code)

    def _ndarray_called(self, *args: object) -> NoReturn:
        self.refuse("calls numpy.ndarray directly, which a CIFAR-10 archive never does")

    def reconstruct(self, subtype: object, shape: object, typecode: object) -> _Array:
        if subtype is not self.ndarray or shape != (0,) or typecode not in (b"b", "b"):
            raise pickle.UnpicklingError("_reconstruct called other than as numpy pickles an array")
        array = np.ndarray.__new__(_Array, (0,), "b")
        array.checks = self
        return array

    def frombuffer(self, buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
        # Protocol 5 rebuilds an array from its bytes (in-band, as bytes or bytearray) as a view of them.
        if not isinstance(buffer, (bytes, bytearray)) or order != "C":
            raise pickle.UnpicklingError("_frombuffer called other than as numpy pickles a C-order array")
        dtype = self.checked(dtype, shape, len(buffer))
        return np.frombuffer(buffer, dtype).reshape(shape)

    def array_state(self, state: object) -> tuple:
        # numpy pickles an array's state as (version, shape, dtype, Fortran order?, its bytes).
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("an array state that is not numpy's")
        version, shape, dtype, fortran, data = state
        if fortran is not False:
            self.refuse("holds an array that is not C-contiguous")
        if not isinstance(data, bytes):
            raise pickle.UnpicklingError("an array state without its bytes")
        return version, shape, self.checked(dtype, shape, len(data)), False, data

    def checked(self, dtype: object, shape: object, size: int) -> np.dtype:
        """The numpy dtype of an array of `shape` built from `size` bytes, if they fill it exactly."""
        if not isinstance(dtype, _Dtype):
            raise pickle.UnpicklingError("an array whose dtype is not numpy.dtype's")
        if not isinstance(shape, tuple) or len(shape) > 2 or not all(type(n) is int and n >= 0 for n in shape):
            self.refuse(f"holds an array of shape {_brief(shape)}; a CIFAR-10 batch holds 1 or 2 dimensions")
        numpy_dtype = dtype.numpy()
        if any(n > self.budget for n in shape) or size != numpy_dtype.itemsize * math.prod(shape):
            self.refuse(f"declares an array of shape {_brief(shape)} and type {numpy_dtype} that its {size:,} "
                        "bytes do not fill")
        self.spend(size)
        return numpy_dtype


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


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
