"""Fetching the CIFAR-10 archive that data.url names, and checking it.

data.url may be an http(s) URL, a file:// URL or a local path (relative paths
are resolved against the project root): `locate` turns it into a URL to
download or a file to copy, or a one-line error naming it. HTTP downloads
retry with backoff and resume with a Range request. `verify` checks the md5
and that the archive reads to its end and holds the CIFAR-10 batches.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from transfer.cifar10 import REQUIRED
from transfer.errors import PipelineError
from transfer.paths import ARCHIVE, resolve_local

RETRIES = 5
FIRST_BACKOFF_SECONDS = 0.5  # doubles each try: 7.5 s of waiting in all
CHUNK = 1 << 20
OFFLINE_HINT = "point data.url at a local copy and data.md5 at its checksum (see README)"
SUPPORTED = "an http(s) URL, a file:// URL or a local path"
# http.client refuses these with a traceback in the middle of the download; refused up front, data.url is named.
UNSENDABLE = re.compile(r"[\x00-\x20\x7f-\U0010ffff]")


def locate(url: str) -> str | Path:
    """What data.url names: an http(s) URL to download, or a local file to copy."""
    if not url.strip():
        raise PipelineError(f"data.url is empty; give {SUPPORTED}")
    try:
        parts = urlparse(url)
        parts.port  # noqa: B018  (parsing the port is what raises on a malformed one)
    except ValueError as error:
        raise PipelineError(f"data.url: {url} is not a valid URL ({error})") from None
    if parts.scheme in ("http", "https"):
        return _web_url(url, parts.hostname)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise PipelineError(f"data.url: {url} names the host {parts.netloc}; a file:// URL takes an absolute "
                                "path (file:///path/to/archive), or give the path itself")
        return _local_file(resolve_local(unquote(parts.path)))
    if "://" in url:
        raise PipelineError(f"data.url: {url} uses the unsupported scheme {parts.scheme or '(none)'}; "
                            f"give {SUPPORTED}")
    return _local_file(resolve_local(url))  # a colon alone ("runs:2024/...") still makes a path


def _web_url(url: str, host: str | None) -> str:
    if not host:
        raise PipelineError(f"data.url: {url} has no host")
    if UNSENDABLE.search(url):
        raise PipelineError(f"data.url: {url!r} contains a space, control or non-ASCII character; "
                            "percent-encode it (a space is %20)")
    return url


def _local_file(source: Path) -> Path:
    if not source.exists():
        raise PipelineError(f"data.url: {source} does not exist; {OFFLINE_HINT}")
    if source.is_dir():
        raise PipelineError(f"data.url: {source} is a directory, not a file; give the archive's path in it")
    if not source.is_file():
        raise PipelineError(f"data.url: {source} is not a regular file")
    return source


def fetch(source: str | Path, destination: Path) -> None:
    """Copy `source` (from locate) to `destination`: HTTP(S) with retries and resume, or a local file."""
    if isinstance(source, str):
        _download(source, destination)
        return
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
    """The file's md5 as 32 lowercase hex digits, read a chunk at a time."""
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


def is_the_archive(source: str | Path) -> bool:
    """Whether data.url names the download stage's own output (dvc.yaml keeps it, as a persist output)."""
    return isinstance(source, Path) and ARCHIVE.exists() and source.samefile(ARCHIVE)
