"""Stage 1: fetch the CIFAR-10 archive from data.url and verify it.

data.url may be an http(s) URL, a file:// URL or a local path (relative paths
are resolved against the project root). HTTP downloads retry with backoff and
resume with a Range request; the archive lands under data/ only once its md5
and layout check out.
"""

from __future__ import annotations

import hashlib
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from transfer.cifar10 import REQUIRED
from transfer.config import load_params
from transfer.errors import PipelineError, run_stage
from transfer.outputs import atomic_output
from transfer.paths import ARCHIVE, resolve_local

RETRIES = 5
FIRST_BACKOFF_SECONDS = 0.5  # doubles each try: 7.5 s of waiting in all
CHUNK = 1 << 20
OFFLINE_HINT = "point data.url at a local copy and data.md5 at its checksum (see README)"


def fetch(url: str, destination: Path) -> None:
    """Copy `url` to `destination`: HTTP(S) with retries and resume, or a local file."""
    if urlparse(url).scheme in ("http", "https"):
        _download(url, destination)
        return
    source = resolve_local(unquote(urlparse(url).path) if url.startswith("file://") else url)
    if not source.is_file():
        raise PipelineError(f"data.url: {source} does not exist; {OFFLINE_HINT}")
    with open(source, "rb") as reader, open(destination, "wb") as writer, _progress(
        source.stat().st_size, source.name
    ) as bar:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            bar.update(len(chunk))


def _download(url: str, destination: Path) -> None:
    destination.write_bytes(b"")
    backoff = FIRST_BACKOFF_SECONDS
    for attempt in range(1, RETRIES + 1):
        try:
            _download_remaining(url, destination)
            return
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == RETRIES:
                raise PipelineError(f"{url} answered HTTP {error.code} {error.reason}; {OFFLINE_HINT}") from None
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            if attempt == RETRIES:
                why = getattr(error, "reason", error)
                raise PipelineError(
                    f"could not download {url} after {RETRIES} tries ({why}); {OFFLINE_HINT}"
                ) from None
            reason = type(error).__name__
        print(f"download: {reason}, retrying in {backoff:.0f} s (try {attempt + 1}/{RETRIES})")
        time.sleep(backoff)
        backoff *= 2


def _download_remaining(url: str, destination: Path) -> None:
    """Fetch what is not yet in `destination`, resuming with a Range request when possible."""
    have = destination.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        mode = "ab" if have else "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(destination, mode) as writer, _progress(total, Path(urlparse(url).path).name) as bar:
            bar.update(have)
            while chunk := response.read(CHUNK):
                writer.write(chunk)
                bar.update(len(chunk))
        if total is not None and destination.stat().st_size < total:
            raise ConnectionError("connection closed before the end of the file")


def _progress(total: int | None, name: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, mininterval=1)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected_md5: str, source: str) -> None:
    """Check the checksum, then that the archive reads to its end and has the CIFAR-10 batches."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            names = {member.name for member in archive}
        problem = None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        names, problem = set(), f"truncated or corrupt ({type(error).__name__})"
    actual = md5_of(path)
    if actual != expected_md5:
        what = problem or "a different file"
        raise PipelineError(
            f"{source}: md5 {actual} does not match data.md5 {expected_md5}; the file is {what}. "
            "Fetch it again, or set data.md5 if you meant to use this file"
        )
    if problem:
        raise PipelineError(f"{source} is {problem}")
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise PipelineError(f"{source} is not a CIFAR-10 python archive: {missing[0]} is missing")


def main() -> None:
    params = load_params()
    with atomic_output(ARCHIVE) as partial:
        fetch(params.data.url, partial)
        verify(partial, params.data.md5, params.data.url)
    print(f"download: {ARCHIVE} verified (md5 {params.data.md5})")


if __name__ == "__main__":
    run_stage(main)
