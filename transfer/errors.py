"""One exception for every refusal the pipeline explains to the user."""

from __future__ import annotations

import gc
import re
import signal
import sys
from collections.abc import Callable
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


class PipelineError(Exception):
    """A problem the user can fix; its message is one line that names the file or key."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit code 1, Ctrl-C exit code 130."""
    # What the imports made (TensorFlow's, Keras' and matplotlib's millions of objects) lives as long as the process:
    # frozen, the garbage collector stops walking it during the run and at exit, where it took about 1 of a tiny
    # stage's 5 to 8 CPU-s (BENCHMARKS.md, "A stage process's start and exit").
    gc.freeze()
    previous = _catch_interrupts()
    try:
        main()
        raise_if_interrupted()  # a Ctrl-C that Python dropped after the last check: the run still does not count
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was recorded as done, rerun `dvc repro`", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        _restore(previous)
        gc.freeze()  # and what main() leaves for the exit


# Python raises Ctrl-C's KeyboardInterrupt wherever the main thread is, and drops it ("Exception ignored") when that
# is a destructor: while Keras fits, a stopped epoch's TensorFlow functions are freed in their __del__, and one Ctrl-C
# in several was lost there (the stage trained on to the end). So a Ctrl-C is also recorded, and the training loop
# (raise_if_interrupted) and run_stage raise it again.
_interrupted = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came during this stage, also when Python dropped its exception."""
    if _interrupted:
        raise KeyboardInterrupt


def _on_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _catch_interrupts() -> tuple[object, object] | None:
    global _interrupted
    _interrupted = False
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None  # started with Ctrl-C ignored (nohup, a background job) or handled by the caller: leave it so
    default_hook = sys.unraisablehook
    previous = signal.signal(signal.SIGINT, _on_interrupt), default_hook

    def quiet_about_interrupts(unraisable: sys.UnraisableHookArgs) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # recorded: no traceback for the user
            default_hook(unraisable)

    sys.unraisablehook = quiet_about_interrupts
    return previous


def _restore(previous: tuple[object, object] | None) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous[0])
        sys.unraisablehook = previous[1]


def tensorflow_reason(message: str) -> str:
    """What a TensorFlow op error's message says, without the op and function names around it: "corrupted record at
    0"."""
    line = message.splitlines()[0]
    return re.sub(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", line)


def describe_validation(error: ValidationError, root: type[BaseModel]) -> str:
    """The first problem pydantic found in a `root`, as 'key.path: what is wrong'."""
    first = error.errors()[0]
    location, section = _walk([part for part in first["loc"] if not _is_type_tag(part)], root)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key (allowed: {', '.join(section.model_fields)})"
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] == "literal_error":
        message = f"got {first['input']!r}; {message[0].lower()}{message[1:]}"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        message = f"got {first['input']!r}: {message}"
    if error.error_count() > 1:
        message += f" (and {error.error_count() - 1} more problem(s))"
    return f"{location}: {message}" if location else message


def _is_type_tag(part: object) -> bool:
    # pydantic names union branches ("int", "literal['all']", "constrained-int") in locations.
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool", "none") or "[" in part or "-" in part
    )


def _walk(location: list, root: type[BaseModel]) -> tuple[str, type[BaseModel]]:
    """The location as params.yaml's comments and errors write it ("data.sources[0].url", "strategies.2.epochs":
    list items in brackets, mapping keys dotted), and the section that holds its last key."""
    text, annotation, section = "", root, root
    for part in location:
        inner = _plain(annotation)
        if get_origin(inner) is list:
            text, annotation = f"{text}[{part}]", get_args(inner)[0]
            continue
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            section = inner
            annotation = inner.model_fields[part].annotation if part in inner.model_fields else None
        else:  # a mapping's key (strategies), or a value with nothing inside
            annotation = get_args(inner)[1] if get_origin(inner) is dict else None
        text = f"{text}.{part}" if text else str(part)
    return text, section


def _plain(annotation: object) -> object:
    """The type inside Annotated[...] and `X | None`, where a location can go on."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        inner = [_plain(arg) for arg in get_args(annotation) if arg is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation
