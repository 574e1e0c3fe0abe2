"""The first guard on a CIFAR-10 batch's pickle: a scan of its opcodes before anything unpickles it.

It follows the unpickler's stack, tracking only how deep each tuple on it nests, and refuses what makes objects
of classes, sets, extensions or references, more opcodes than a batch holds, tuples nested deeper than numpy
nests them, and memo indices that would make the C unpickler allocate room for indices never used. The second
guard, the unpickler with checked globals, is transfer/pickle_load.py; transfer/cifar10.py calls both.
"""

from __future__ import annotations

import pickle
import pickletools

from transfer.errors import PipelineError

MAX_OPCODES = 250_000  # the shared copy's batches hold 90,152 each
MAX_TUPLE_DEPTH = 16  # numpy's pickles nest tuples 2 deep

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


def scan(data: bytes, where: str) -> None:
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
            if len(stack) <= fence:
                raise pickle.UnpicklingError("STOP without an object")
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
