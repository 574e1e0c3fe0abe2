"""The second guard on a CIFAR-10 batch's pickle: the C unpickler, with checked globals only.

The only globals are numpy's array rebuilders and `_codecs.encode`, each replaced by a function that checks its
arguments (integer or float types, C order, a shape that the bytes it is given fill exactly) and counts what it
builds against twice the member's size, before numpy or the codec allocates anything. Run it on a pickle that
transfer/pickle_scan.py passed.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from typing import NoReturn

import numpy as np

from transfer.errors import PipelineError

DTYPES = frozenset({"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"})


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


class BatchUnpickler(pickle.Unpickler):
    """Unpickles one scanned batch; only the globals of Checks resolve."""

    def __init__(self, data: bytes, checks: Checks) -> None:
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


class Checks:
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
