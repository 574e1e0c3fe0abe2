"""Outputs that appear whole or not at all, whatever stops the process and whenever.

Every output (file or folder) is written into a hidden temporary sibling, flushed to disk
(every file, then every folder, with fsync), and only then made current, in steps that a
kill or a power cut may interrupt between any two:

    1. write `.<name>.tmp-PID`, fsync it                    the new version is being written
    2. rename it to `.<name>.new-PID`, fsync the parent     the new version is complete
    3. rename `<name>` aside to `.<name>.old-PID`            (if there was one)
    4. rename `.<name>.new-PID` to `<name>`                  the new version is current
    5. delete `.<name>.old-PID`

`recover` (run before every write, and by checkpoints.resume before reading) finishes an
interrupted replacement: a complete new version is moved in (steps 3-5 again), else an old
version set aside is moved back, and every other leftover is deleted. So a start after a kill
at any instant finds the old or the new version, never neither, and nothing half-written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transfer.errors import PipelineError

# A write that fails for want of room: disk full, quota, or a file size limit (ulimit -f, FAT32's 4 GiB).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

_before_step = None  # tests set a callable(step: str) here to stop the process between two steps


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _siblings(final: Path, kind: str) -> list[Path]:
    return sorted(final.parent.glob(f".{final.stem}.{kind}-*{final.suffix}"))


def _sibling(final: Path, kind: str) -> Path:
    # The suffix stays last: Keras insists that a model file ends in .keras.
    return final.with_name(f".{final.stem}.{kind}-{os.getpid()}{final.suffix}")


def _step(name: str) -> None:
    if _before_step is not None:
        _before_step(name)


def fsync_tree(path: Path) -> None:
    """Flush a file, or a folder's files and the folders themselves, to the disk."""
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(folder) / name, os.O_RDONLY)
            _fsync(Path(folder), os.O_RDONLY | os.O_DIRECTORY)
    elif path.is_file():
        _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_parent(path: Path) -> None:
    """Make a rename in path's folder durable."""
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _make_current(final: Path, new: Path) -> None:
    """Steps 3 to 5: `new` (complete and flushed) replaces `final`, which never goes missing for good."""
    aside = _sibling(final, "old")
    if final.exists() or final.is_symlink():
        _step("set the old version aside")
        os.replace(final, aside)
        _fsync_parent(final)
    _step("move the new version in")
    os.replace(new, final)
    _fsync_parent(final)
    _step("delete the old version")
    remove(aside)


def recover(final: Path | str) -> None:
    """Finish a replacement of `final` that a killed process left half done, and delete its leftovers."""
    final = Path(final)
    complete = _siblings(final, "new")
    if complete:
        # At most one: every write recovers first. A newer one could only come from a concurrent writer.
        _make_current(final, complete[-1])
    elif not (final.exists() or final.is_symlink()):
        set_aside = _siblings(final, "old")
        if set_aside:
            os.replace(set_aside[-1], final)
            _fsync_parent(final)
    for leftover in (*_siblings(final, "tmp"), *_siblings(final, "new"), *_siblings(final, "old")):
        remove(leftover)


@contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write `final` into (file or folder); make it current on success.

    A write that fails for want of disk space is one line naming `final`; nothing of it is left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    temporary = _sibling(final, "tmp")
    try:
        yield temporary
        _step("flush the new version")
        fsync_tree(temporary)
    except BaseException as error:
        remove(temporary)
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            raise no_room(final, error) from None
        raise
    complete = _sibling(final, "new")
    _step("mark the new version complete")
    os.replace(temporary, complete)
    _fsync_parent(final)
    _make_current(final, complete)


def no_room(path: Path, error: OSError) -> PipelineError:
    """The one line for a write to `path` that ran out of disk space."""
    return PipelineError(f"no room to write {path}: {error.strerror or error} "
                         f"(free disk space under {path.parent.resolve()} and rerun)")


def write_json(path: Path | str, payload: object) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text)
