"""The opcode scan against the unpickler it guards: on programs of the opcodes the scan accepts, it refuses a
pickle exactly when CPython's own (C) unpickler finds its stack, marks, memo or data wrong.

The scan follows the unpickler's stack without building anything; where it disagrees with the unpickler it either
refuses a good batch or lets the unpickler meet a broken one first. Hypothesis writes the programs, derandomized so
every run sees the same ones; they are tiny, so thousands take a few seconds in this process.
"""

from __future__ import annotations

import io
import pickle
import pickletools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from transfer.errors import PipelineError
from transfer.pickle_scan import _REFUSED, MAX_OPCODES, MAX_TUPLE_DEPTH, scan


def length_prefixed(code: bytes, width: int, signed: bool = False) -> st.SearchStrategy[bytes]:
    """An opcode whose argument is a length of `width` bytes and that many bytes."""
    return st.binary(max_size=3).map(lambda data: code + len(data).to_bytes(width, "little", signed=signed) + data)


def index(code: bytes, width: int) -> st.SearchStrategy[bytes]:
    """A memo opcode with a binary index of `width` bytes. Indices stay below 2: the scan refuses a PUT whose index
    is higher than the count of opcodes before it (the C unpickler would allocate room for the indices between)."""
    return st.integers(0, 1).map(lambda number: code + number.to_bytes(width, "little"))


PUSH = st.one_of(
    st.sampled_from([b"N", b"\x88", b"\x89", b"I7\n", b"L7\n", b"F1.5\n", b"S'a'\n", b"Va\n", b")", b"]", b"}",
                     b"cbuiltins\nanything\n"]),
    st.binary(min_size=1, max_size=1).map(lambda data: b"K" + data),
    st.binary(min_size=2, max_size=2).map(lambda data: b"M" + data),
    st.binary(min_size=4, max_size=4).map(lambda data: b"J" + data),
    st.binary(min_size=8, max_size=8).map(lambda data: b"G" + data),
    length_prefixed(b"\x8a", 1), length_prefixed(b"\x8b", 4, signed=True),  # LONG1, LONG4
    length_prefixed(b"U", 1), length_prefixed(b"T", 4, signed=True),  # SHORT_BINSTRING, BINSTRING
    length_prefixed(b"C", 1), length_prefixed(b"B", 4), length_prefixed(b"\x8e", 8),  # bytes
    length_prefixed(b"\x96", 8),  # BYTEARRAY8
    st.sampled_from([b"\x8c\x01a", b"X\x01\x00\x00\x00a", b"\x8d\x01\x00\x00\x00\x00\x00\x00\x00a"]),  # str
)
# Tuples, marks and what takes items off the stack: what the scan tracks, so 2 of 5 opcodes drawn.
STACK = st.sampled_from([b"\x85", b"\x86", b"\x87", b"(", b"t", b"l", b"d", b"e", b"u", b"1", b"0", b"2", b"a", b"s",
                         b"b", b"R", b"\x93"])
MEMO = st.one_of(index(b"q", 1), index(b"r", 4), index(b"h", 1), index(b"j", 4),
                 st.sampled_from([b"p0\n", b"p1\n", b"g0\n", b"g1\n", b"\x94"]))
# (st.one_of would flatten its branches and draw among the ~20 leaves, stack opcodes 1 time in 20.)
OPCODE = st.sampled_from([PUSH, PUSH, STACK, STACK, MEMO]).flatmap(lambda kind: kind)

# What the C unpickler says of a wrong stack, mark, memo or data; anything else it raises is about the objects
# built (a list without __setstate__, a REDUCE of non-tuple arguments), which the scan does not look at.
STRUCTURAL = ("unpickling stack underflow", "could not find MARK", "unexpected MARK found",
              "pickle data was truncated", "Memo value not found", "negative byte count")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return lambda *args, **kwargs: []


def unpickler_verdict(data: bytes) -> bool | None:
    """True if the C unpickler loads `data`, False if it finds it structurally wrong, None for anything else."""
    try:
        _Unpickler(io.BytesIO(data)).load()
    except EOFError:
        return False
    except pickle.UnpicklingError as error:
        if any(part in str(error) for part in STRUCTURAL):
            return False
        return None
    except Exception:
        return None
    return True


def scan_verdict(data: bytes) -> bool | None:
    """True if the scan lets `data` through, False if it refuses it as a broken pickle, None for its own limits."""
    try:
        scan(data, "batch")
    except pickle.UnpicklingError:
        return False
    except PipelineError:  # tuples nested too deep: a limit of the scan, not of the unpickler
        return None
    return True


@st.composite
def programs(draw) -> bytes:
    """PROTO 2 (or none), opcodes, STOP, sometimes cut short."""
    body = b"".join(draw(st.lists(OPCODE, max_size=16)))
    data = draw(st.sampled_from([b"\x80\x02", b""])) + body + b"."
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=3000, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(programs())
def test_the_scan_refuses_exactly_what_the_unpickler_finds_broken(data):
    expected = unpickler_verdict(data)
    assume(expected is not None)
    found = scan_verdict(data)
    assume(found is not None)
    assert found == expected, (data, "unpickler loads it" if expected else "unpickler refuses it")


# Hand-made programs at the scan's edges, with what it says of each (None: it lets the program through); the C
# unpickler agrees with each verdict. Random programs reach some of these only rarely.
EDGES = [
    (b"", "pickle data was truncated"),
    (b"\x80\x02N", "pickle data was truncated"),  # no STOP
    (b"]((e1.", "APPENDS without the items it needs"),  # the list is below the outer mark
    (b"}((u1.", "SETITEMS without the items it needs"),
    (b"](Na1.", "APPEND without the items it needs"),  # the list is below the mark
    (b"}(NNs1.", "SETITEM without the items it needs"),
    (b"(N\x85\x86.", "TUPLE2 without the items it needs"),
    (b"N(\x85.", "TUPLE1 without the items it needs"),
    (b"NNN(\x87.", "TUPLE3 without the items it needs"),
    (b"(t.", None),
    (b"(0N.", None),  # POP right after MARK takes the mark
    (b"N(0.", None),
    (b"(N(N00.", None),  # POP above a mark takes the item, then the mark
    (b"((0N1.", "STOP without an object"),
    (b"N((01.", None),
    (b"0.", "POP on an empty stack"),
    (b"N00.", "POP on an empty stack"),
    (b"2.", "DUP on an empty stack"),
    (b"N(2.", "DUP on an empty stack"),
    (b"h\x00N.", "memo index 0 was never set"),
    (b"Nq\x00h\x01.", "memo index 1 was never set"),
    (b"\x80\x04\x95\x03\x00\x00\x00\x00\x00\x00\x00N.", "frame larger than the data"),
    (b"\x95\x01\x00\x00\x00\x00\x00\x00\x00N.", None),  # a frame that ends before the data does
    (b"cbuiltins", "GLOBAL without its newline"),
    (b"cbuiltins\nx", "GLOBAL without its newline"),  # the second line's
    (b"I1", "INT without its newline"),
    (b"\nN.", "unknown opcode 0xa"),
    (b"T\xff\xff\xff\xffN.", "BINSTRING longer than the data"),  # a negative length
    (b"T\x01\x00\x00\x00", "BINSTRING longer than the data"),
    (b"U\x02a", "SHORT_BINSTRING longer than the data"),
    (b"U\x01a.", None),  # a string up to the STOP
    (b"U\x01a", "pickle data was truncated"),  # a string up to the end: no STOP
    (b"Nr\x00\x00\x00\x00h\x00.", None),  # LONG_BINPUT is a PUT
    (b"Nq\x01h\x01.", None),  # a PUT's index is its argument (MEMOIZE's is the memo's length)
    (b"B\x01\x00\x00\x00a.", None),
    (b"B\x01\x00\x00\x80a.", "BINBYTES longer than the data"),  # unsigned: 2**31 + 1
    (b"\x8e\x01\x00\x00\x00\x00\x00\x00\x00", "BINBYTES8 longer than the data"),
    (b"K", "BININT1 truncated"),
    (b"M\x01", "BININT2 truncated"),
    (b"J\x01\x00\x00", "BININT truncated"),
]


@pytest.mark.parametrize(("data", "message"), EDGES)
def test_the_scan_at_its_edges(data, message):
    assert unpickler_verdict(data) in (message is None, None)
    if message is None:
        scan(data, "batch")
    else:
        with pytest.raises(pickle.UnpicklingError) as error:
            scan(data, "batch")
        assert str(error.value) == message


@pytest.mark.parametrize("data", [
    b"\x80\x02.",  # STOP with nothing on the stack
    b"\x80\x02(.",  # STOP on a mark
    b"\x80\x02(N1.",  # POP_MARK took the only item
])
def test_a_stop_without_an_object_is_refused(data):
    assert unpickler_verdict(data) is False
    with pytest.raises(pickle.UnpicklingError):
        scan(data, "batch")


# --- the scan's own limits, stricter than the unpickler's, each at its edge ------------------------------------


@pytest.mark.parametrize("name", sorted(_REFUSED))
def test_opcodes_that_make_objects_of_classes_sets_or_references_are_refused_naming_them(name):
    code = next(op.code for op in pickletools.opcodes if op.name == name).encode("latin1")
    with pytest.raises(PipelineError) as error:
        scan(b"\x80\x02N" + code + b".", "batch")
    assert str(error.value) == (f"batch uses the pickle opcode {name}, which a CIFAR-10 archive never needs; "
                                "refusing to load it")


def test_tuples_nest_16_deep_and_no_deeper():
    scan(b"N" + b"\x85" * MAX_TUPLE_DEPTH + b".", "batch")
    scan(b"(" * MAX_TUPLE_DEPTH + b"N" + b"t" * MAX_TUPLE_DEPTH + b".", "batch")
    for deeper in (b"N" + b"\x85" * (MAX_TUPLE_DEPTH + 1) + b".",
                   b"N" + b"\x85" * MAX_TUPLE_DEPTH + b"N\x86.",  # a tuple beside a deep one is as deep plus one
                   b"(" * (MAX_TUPLE_DEPTH + 1) + b"N" + b"t" * (MAX_TUPLE_DEPTH + 1) + b"."):
        with pytest.raises(PipelineError) as error:
            scan(deeper, "batch")
        assert str(error.value) == ("batch nests tuples more than 16 deep, which a CIFAR-10 archive never needs; "
                                    "refusing to load it")


def test_a_tuple_of_what_the_memo_or_dup_gives_is_as_deep_as_the_original():
    deep = b"N" + b"\x85" * MAX_TUPLE_DEPTH
    for then in (b"q\x00h\x00\x86", b"2\x86", b"p0\ng0\n\x86", b"\x94h\x00\x86"):
        with pytest.raises(PipelineError, match="nests tuples more than 16 deep"):
            scan(deep + then + b".", "batch")
    scan(b"N" + b"\x85" * (MAX_TUPLE_DEPTH - 1) + b"2\x86.", "batch")  # two of depth 15 make one of 16


DEEP = b"N" + b"\x85" * MAX_TUPLE_DEPTH  # a tuple 16 deep


@pytest.mark.parametrize("holder", [
    b"(" + DEEP + b"l",  # LIST
    b"(K\x01" + DEEP + b"d",  # DICT
    b"]" + DEEP + b"a",  # APPEND
    b"](" + DEEP + b"e",  # APPENDS
    b"}K\x01" + DEEP + b"s",  # SETITEM
    b"}(K\x01" + DEEP + b"u",  # SETITEMS
    b"cbuiltins\nx\nN" + b"\x85" * MAX_TUPLE_DEPTH + b"R",  # REDUCE of arguments 16 deep
])
def test_what_holds_a_deep_tuple_outside_a_tuple_starts_again_at_depth_0(holder):
    """A list, a dict or a call's result is depth 0 whatever it holds: a tuple of it is 1 deep, not 17."""
    scan(holder + b"\x85.", "batch")
    assert unpickler_verdict(holder + b"\x85.") is True


@pytest.mark.parametrize("then", [b")R", b"\x8c\x01b\x93"])
def test_what_a_call_or_stack_global_returns_is_depth_0_whatever_it_was_given(then):
    """REDUCE's result and STACK_GLOBAL's are no tuple of what made them, even a tuple 16 deep below them."""
    scan(DEEP + then + b"\x85.", "batch")
    scan(b"cbuiltins\nx\n)R" + b"\x85" * MAX_TUPLE_DEPTH + b".", "batch")  # 16 tuples around a result: 16 deep


@pytest.mark.parametrize("innermost", [b"(l", b"(d", b"]", b"}", b")"])
def test_an_empty_tuple_is_1_deep_and_a_list_or_dict_0(innermost):
    tuples = MAX_TUPLE_DEPTH - (innermost == b")")
    scan(innermost + b"\x85" * tuples + b".", "batch")
    with pytest.raises(PipelineError, match="nests tuples more than 16 deep"):
        scan(innermost + b"\x85" * (tuples + 1) + b".", "batch")


def test_build_keeps_the_depth_of_what_it_sets_state_on():
    with pytest.raises(PipelineError, match="nests tuples more than 16 deep"):
        scan(DEEP + b"Nb\x85.", "batch")


def test_at_most_250000_opcodes():
    pairs = (MAX_OPCODES - 2) // 2  # N, then POP and N again, then STOP: 2 + 2 * pairs opcodes
    scan(b"N" + b"0N" * pairs + b".", "batch")
    with pytest.raises(PipelineError) as error:
        scan(b"\x80\x02N" + b"0N" * pairs + b".", "batch")
    assert str(error.value) == ("batch holds more than 250,000 pickle opcodes, more than a CIFAR-10 batch needs; "
                                "refusing to load it")


def test_a_memo_index_beyond_the_opcodes_before_it_is_refused():
    """The C unpickler would take it (and allocate room for every index up to it); no pickler writes it."""
    scan(b"\x80\x02Nq\x02.", "batch")
    for put in (b"\x80\x02Nq\x03.", b"Nr\x02\x00\x00\x00.", b"Np2\n."):
        assert unpickler_verdict(put) is True
        with pytest.raises(pickle.UnpicklingError, match="^memo index [23] at opcode [12]$"):
            scan(put, "batch")


@pytest.mark.parametrize(("size", "allowed"), [(2, True), (3, False)])
def test_a_frame_may_hold_at_most_the_rest_of_the_data(size, allowed):
    data = b"\x80\x04\x95" + size.to_bytes(8, "little") + b"N."
    assert unpickler_verdict(data) is allowed
    assert scan_verdict(data) is allowed


@pytest.mark.parametrize("data", [b"\xff.", b"\x80\x02N\x00."])
def test_an_unknown_opcode_is_refused_naming_it(data):
    with pytest.raises(pickle.UnpicklingError, match=f"^unknown opcode {data[-2]:#x}$"):
        scan(data, "batch")
