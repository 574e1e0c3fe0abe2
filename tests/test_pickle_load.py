"""The unpickler's checked globals, each at the edge of what it accepts.

A CIFAR-10 batch reaches numpy only through Checks: a dtype of a number type, `_reconstruct` called as numpy
pickles an array, an array state of C-order bytes that fill its shape exactly, and no more bytes built than twice
the member holds. Each test calls a check as the unpickler would, with what numpy writes and with one thing off.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from transfer.errors import PipelineError
from transfer.pickle_load import DTYPES, BatchUnpickler, Checks, _Array, _Dtype, _Global

WHERE = "archive.tar.gz: data_batch_1"
PLAIN_STATE = (3, "<", None, None, None, -1, -1, 0)  # numpy's state of np.dtype("<u2")


def refused(why: str) -> str:
    return f"{WHERE} {why}; refusing to load it"


@pytest.fixture
def checks() -> Checks:
    return Checks(WHERE, 1000)  # a member of 1,000 bytes: 2,000 bytes of arrays and byte strings to build


def dtype(checks: Checks, code: str, order: str = "|") -> _Dtype:
    made = checks.dtype(code, False, True)
    made.__setstate__((3, order, None, None, None, -1, -1, 0))
    return made


# --- numpy.dtype ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_number_type_is_a_dtype_by_text_or_bytes(checks, code):
    assert checks.dtype(code, False, True).numpy() == np.dtype(code)
    assert checks.dtype(code.encode(), 0, 1).numpy() == np.dtype(code)  # the official archive's numpy wrote ints


@pytest.mark.parametrize("code", ["O", "U1", "V8", "S1", "c8", "M8", "u16", b"O", 7])
def test_a_type_that_is_not_a_number_is_refused_naming_it(checks, code):
    with pytest.raises(PipelineError) as error:
        checks.dtype(code, False, True)
    shown = code.decode() if isinstance(code, bytes) else code
    assert str(error.value) == refused(f"holds an array of type {shown!r}; a CIFAR-10 batch holds numbers (no "
                                       "objects, records or strings)")


@pytest.mark.parametrize(("align", "copy"), [(2, True), (False, -1), (0.0, 1), (False, "1"), (None, True)])
def test_dtype_flags_other_than_numpys_are_refused(checks, align, copy):
    with pytest.raises(PipelineError, match="holds an array of type 'u1'"):
        checks.dtype("u1", align, copy)


def test_dtype_defaults_and_boolean_flags_are_numpys(checks):
    assert checks.dtype("u1").numpy() == np.dtype("u1")
    assert checks.dtype("u1", True, False).numpy() == np.dtype("u1")


@pytest.mark.parametrize(("order", "expected"), [("<", np.dtype("<u2")), (">", np.dtype(">u2")),
                                                 ("|", np.dtype("u2")), ("=", np.dtype("u2")),
                                                 (b">", np.dtype(">u2"))])
def test_a_plain_dtype_state_sets_the_byte_order(checks, order, expected):
    made = checks.dtype("u2", False, True)
    assert made.order == "="  # before numpy's BUILD: native
    made.__setstate__((3, order, None, None, None, -1, -1, 0))
    assert made.numpy().str == expected.str  # the byte order it reads in


@pytest.mark.parametrize("state", [
    PLAIN_STATE[:7], (*PLAIN_STATE, 0), list(PLAIN_STATE), None, (3, "!", *PLAIN_STATE[2:]),
    (3, "<", ("a", "b"), *PLAIN_STATE[3:]), (3, "<", None, None, None, 8, -1, 0), (3, "<", *PLAIN_STATE[2:7], 16),
])
def test_a_dtype_state_other_than_a_plain_number_types_is_refused(checks, state):
    with pytest.raises(pickle.UnpicklingError, match="^a dtype state that is not a plain number type's$"):
        checks.dtype("u2", False, True).__setstate__(state)


# --- numpy's _reconstruct, an array's state, _frombuffer ------------------------------------------------------


def test_reconstruct_as_numpy_calls_it_makes_an_empty_array_that_keeps_its_checks(checks):
    for typecode in (b"b", "b"):
        array = checks.reconstruct(checks.ndarray, (0,), typecode)
        assert type(array) is _Array and array.shape == (0,) and array.checks is checks


@pytest.mark.parametrize("arguments", [("ndarray", (0,), b"b"), ("same", (1,), b"b"), ("same", [0], b"b"),
                                       ("same", (0,), b"B"), ("same", (0,), "f")])
def test_reconstruct_called_otherwise_is_refused(checks, arguments):
    subtype, shape, typecode = arguments
    subtype = checks.ndarray if subtype == "same" else np.ndarray
    with pytest.raises(pickle.UnpicklingError, match="^_reconstruct called other than as numpy pickles an array$"):
        checks.reconstruct(subtype, shape, typecode)


def test_an_array_state_as_numpy_writes_it_becomes_the_array(checks):
    array = checks.reconstruct(checks.ndarray, (0,), b"b")
    array.__setstate__((1, (2, 3), dtype(checks, "u2", "<"), False, bytes(range(12))))
    assert array.dtype == np.dtype("<u2") and array.shape == (2, 3)
    assert array.tolist() == np.frombuffer(bytes(range(12)), "<u2").reshape(2, 3).tolist()
    assert checks.budget == 2000 - 12


@pytest.mark.parametrize("state", [(1, (2,), "u1", False), (1, (2,), "u1", False, b"ab", 0), [1, (2,), "u1", False,
                                                                                              b"ab"]])
def test_an_array_state_that_is_not_numpys_five_fields_is_refused(checks, state):
    with pytest.raises(pickle.UnpicklingError, match="^an array state that is not numpy's$"):
        checks.array_state(state)


@pytest.mark.parametrize("fortran", [True, 1, None])
def test_an_array_state_not_in_c_order_is_refused(checks, fortran):
    with pytest.raises(PipelineError) as error:
        checks.array_state((1, (2,), dtype(checks, "u1"), fortran, b"ab"))
    assert str(error.value) == refused("holds an array that is not C-contiguous")


@pytest.mark.parametrize("data", ["ab", bytearray(b"ab"), memoryview(b"ab"), None])
def test_an_array_state_without_its_bytes_is_refused(checks, data):
    with pytest.raises(pickle.UnpicklingError, match="^an array state without its bytes$"):
        checks.array_state((1, (2,), dtype(checks, "u1"), False, data))


@pytest.mark.parametrize("buffer", [b"\x01\x02\x03\x04", bytearray(b"\x01\x02\x03\x04")])
def test_frombuffer_rebuilds_a_c_order_array_from_bytes(checks, buffer):
    array = checks.frombuffer(buffer, dtype(checks, "u2", ">"), (2,), "C")
    assert array.tolist() == [0x0102, 0x0304]
    assert checks.budget == 2000 - 4


@pytest.mark.parametrize(("buffer", "order"), [(b"\x01\x02", "F"), (b"\x01\x02", "A"), (memoryview(b"\x01\x02"), "C"),
                                               ("\x01\x02", "C")])
def test_frombuffer_of_anything_else_is_refused(checks, buffer, order):
    with pytest.raises(pickle.UnpicklingError, match="^_frombuffer called other than as numpy pickles a C-order"):
        checks.frombuffer(buffer, dtype(checks, "u1"), (2,), order)


# --- shapes, sizes and the budget ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (6,), (2, 3), (0,), (0, 5)])
def test_a_shape_of_at_most_two_dimensions_its_bytes_fill_is_taken(checks, shape):
    size = int(np.prod(shape, dtype=int))
    assert checks.checked(dtype(checks, "u1"), shape, size) == np.dtype("u1")
    assert checks.budget == 2000 - size


@pytest.mark.parametrize("shape", [(1, 1, 1), [2, 3], (2, -1), (True, 1), (2.0,), ("2",), None])
def test_a_shape_of_more_dimensions_or_not_of_counts_is_refused(checks, shape):
    with pytest.raises(PipelineError) as error:
        checks.checked(dtype(checks, "u1"), shape, 1)
    assert str(error.value) == refused(f"holds an array of shape {shape!r}; a CIFAR-10 batch holds 1 or 2 dimensions")


@pytest.mark.parametrize(("shape", "size"), [((3,), 5), ((3,), 7), ((2, 2), 7), ((2001,), 4002), ((1, 2001), 0)])
def test_bytes_that_do_not_fill_the_shape_exactly_are_refused(checks, shape, size):
    with pytest.raises(PipelineError) as error:
        checks.checked(dtype(checks, "u2"), shape, size)
    assert str(error.value) == refused(f"declares an array of shape {shape!r} and type uint16 that its {size:,} bytes "
                                       "do not fill")
    assert checks.budget == 2000


def test_a_dimension_up_to_the_budget_is_taken(checks):
    assert checks.checked(dtype(checks, "b1"), (2000,), 2000) == np.dtype("b1")


def test_an_array_dtype_that_did_not_come_from_numpy_dtype_is_refused(checks):
    with pytest.raises(pickle.UnpicklingError, match="^an array whose dtype is not numpy.dtype's$"):
        checks.checked(np.dtype("u1"), (2,), 2)


def test_the_budget_is_twice_the_member_spent_to_the_last_byte(checks):
    checks.spend(1999)
    checks.spend(1)
    assert checks.budget == 0
    checks.spend(0)
    with pytest.raises(PipelineError) as error:
        checks.spend(1)
    assert str(error.value) == refused("builds more arrays and byte strings than twice its own 1,000 bytes hold")


def test_latin1_text_becomes_its_bytes_and_is_counted(checks):
    assert checks.latin1_bytes("\x00\xff\x80a", "latin1") == b"\x00\xff\x80a"
    assert checks.budget == 2000 - 4


@pytest.mark.parametrize(("text", "encoding"), [("a", "utf-8"), ("a", "latin-1"), (b"a", "latin1"), ("a", None)])
def test_codecs_encode_of_anything_but_latin1_text_is_refused(checks, text, encoding):
    with pytest.raises(pickle.UnpicklingError, match=f"^_codecs.encode with encoding {encoding!r}$"):
        checks.latin1_bytes(text, encoding)
    assert checks.budget == 2000


# --- the globals a pickle can name ----------------------------------------------------------------------------


@pytest.mark.parametrize("package", ["numpy.core", "numpy._core"])
def test_numpys_rebuilders_resolve_by_either_package_name(checks, package):
    unpickler = BatchUnpickler(b".", checks)
    assert unpickler.find_class(f"{package}.multiarray", "ndarray") is checks.ndarray
    assert unpickler.find_class("numpy", "ndarray") is checks.ndarray
    assert unpickler.find_class(f"{package}.multiarray", "dtype") is unpickler.find_class("numpy", "dtype")
    assert type(unpickler.find_class(f"{package}.multiarray", "_reconstruct")(checks.ndarray, (0,), b"b")) is _Array
    rebuilt = unpickler.find_class(f"{package}.numeric", "_frombuffer")(b"\x07", dtype(checks, "u1"), (1,), "C")
    assert rebuilt.tolist() == [7]
    assert unpickler.find_class("_codecs", "encode")("a", "latin1") == b"a"


@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("numpy", "frombuffer"), ("numpy.core.multiarray",
                                                                                             "scalar"),
                                              ("builtins", "eval"), ("numpy._core.numeric", "_reconstruct")])
def test_any_other_global_is_refused_naming_it(checks, module, name):
    with pytest.raises(PipelineError) as error:
        BatchUnpickler(b".", checks).find_class(module, name)
    assert str(error.value) == refused(f"refers to {module}.{name}, which a CIFAR-10 archive never needs")


def test_numpy_ndarray_called_is_refused(checks):
    with pytest.raises(PipelineError) as error:
        checks.ndarray((2,), "u1")
    assert str(error.value) == refused("calls numpy.ndarray directly, which a CIFAR-10 archive never does")


def test_build_cannot_set_anything_on_a_global():
    allowed = _Global(lambda *args: args)
    assert allowed(1, 2) == (1, 2)
    with pytest.raises(pickle.UnpicklingError, match=r"^BUILD on a global \(setting '__dict__'\)$"):
        allowed.__dict__ = {}
    with pytest.raises(pickle.UnpicklingError, match=r"^BUILD on a global \(setting 'x'\)$"):
        allowed.x = 1


def test_a_whole_array_pickle_loads_through_the_checks(checks):
    data = pickle.dumps(np.arange(6, dtype="<i4").reshape(2, 3), protocol=2)
    loaded = BatchUnpickler(data, Checks(WHERE, len(data))).load()
    assert loaded.dtype == np.dtype("<i4") and loaded.tolist() == [[0, 1, 2], [3, 4, 5]]
