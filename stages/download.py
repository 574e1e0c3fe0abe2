"""Stage 1: fetch the CIFAR-10 archive from data.url and verify it (transfer/fetch.py).

The archive lands under data/ only once its md5 and layout check out. A
data.url that is the archive itself (a copy placed in data/ by hand) is
verified where it is and left alone.
"""

from __future__ import annotations

from transfer.config import load_params
from transfer.errors import run_stage
from transfer.fetch import fetch, is_the_archive, locate, verify
from transfer.outputs import atomic_output
from transfer.paths import ARCHIVE


def main() -> None:
    params = load_params()
    source = locate(params.data.url)
    if is_the_archive(source):
        verify(ARCHIVE, params.data.md5, params.data.url)  # a mismatch leaves the user's file where it is
        print(f"download: {ARCHIVE} is data.url itself; verified in place (md5 {params.data.md5})")
        return
    with atomic_output(ARCHIVE) as partial:
        fetch(source, partial)
        verify(partial, params.data.md5, params.data.url)
    print(f"download: {ARCHIVE} verified (md5 {params.data.md5})")


if __name__ == "__main__":
    run_stage(main)
