"""Outputs that appear whole or not at all.

Every stage writes into a hidden temporary sibling and renames it into place
only when it is complete, so a failed or killed stage never leaves something
that a later stage or dvc.lock could take for a finished output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _temporary_siblings(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.stem}.tmp-*{final.suffix}"))


@contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write `final` into (file or folder); rename it on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temporary_siblings(final):  # left by a killed run
        remove(stale)
    # The suffix stays last: Keras insists that a model file ends in .keras.
    temporary = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield temporary
    except BaseException:
        remove(temporary)
        raise
    if final.is_dir() and not final.is_symlink():
        remove(final)  # os.replace cannot overwrite a folder; a file it replaces atomically
    os.replace(temporary, final)


def write_json(path: Path | str, payload: object) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text)
