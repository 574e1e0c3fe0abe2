"""Stage 1: fetch the CIFAR-10 archive from the first of data.sources that is there, and verify it
(transfer/fetch.py).

The archive lands under data/ only once its md5 and layout check out. A
source that is the archive itself (a copy placed in data/ by hand) is
verified where it is and left alone. metrics/download.json says which source
the archive came from.
"""

from __future__ import annotations

from transfer.config import load_params
from transfer.errors import run_stage
from transfer.fetch import fetch_first
from transfer.outputs import write_json
from transfer.paths import ARCHIVE, DOWNLOAD_RECORD


def main() -> None:
    params = load_params()
    index = fetch_first(params.data.sources)
    source = params.data.sources[index]
    write_json(DOWNLOAD_RECORD, {"source": index, "url": source.url, "md5": source.md5})
    print(f"download: {ARCHIVE} verified, from data.sources[{index}] {source.url} (md5 {source.md5})")


if __name__ == "__main__":
    run_stage(main)
