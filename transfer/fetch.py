"""Fetching the CIFAR-10 archive from the first of data.sources that is there, and checking it.

A source's url may be an http(s) URL, a file:// URL or a local path (relative
paths are resolved against the project root): `locate` turns it into a URL to
download or a file to copy, or a one-line error naming it. HTTP downloads
retry with backoff and resume with a Range request. `verify` checks the md5
and that the archive reads to its end and holds the CIFAR-10 batches.
`fetch_first` tries the sources in order: a missing file or a URL that does
not answer is skipped, a file that is there but fails its check is an error.
"""

from __future__ import annotations

import hashlib
import http.client
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
from transfer.config import Source
from transfer.errors import PipelineError
from transfer.outputs import atomic_output
from transfer.paths import ARCHIVE, resolve_local

RETRIES = 5
FIRST_BACKOFF_SECONDS = 0.5  # doubles each try: 7.5 s of waiting in all
CHUNK = 1 << 20
NONE_THERE_HINT = "add a copy you have to data.sources, with its md5 (docs/troubleshooting.md)"
SUPPORTED = "an http(s) URL, a file:// URL or a local path"
# http.client refuses these with a traceback in the middle of the download; refused up front, the source's url is named.
UNSENDABLE = re.compile(r"[\x00-\x20\x7f-\U0010ffff]")


class Unreachable(PipelineError):
    """A URL that did not answer, or answered with an HTTP error, after the retries: a source that is not there."""


def locate(url: str, key: str) -> str | Path:
    """What a source's url (params.yaml's `key`) names: an http(s) URL to download, or a local path to copy,
    which may not exist."""
    if not url.strip():
        raise PipelineError(f"{key} is empty; give {SUPPORTED}")
    try:
        parts = urlparse(url)
        parts.port  # noqa: B018  (parsing the port is what raises on a malformed one)
    except ValueError as error:
        raise PipelineError(f"{key}: {url} is not a valid URL ({error})") from None
    if parts.scheme in ("http", "https"):
        return _web_url(url, parts.hostname, key)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise PipelineError(f"{key}: {url} names the host {parts.netloc}; a file:// URL takes an absolute "
                                "path (file:///path/to/archive), or give the path itself")
        return resolve_local(unquote(parts.path))
    if "://" in url:
        raise PipelineError(f"{key}: {url} uses the unsupported scheme {parts.scheme or '(none)'}; "
                            f"give {SUPPORTED}")
    return resolve_local(url)  # a colon alone ("runs:2024/...") still makes a path


def _web_url(url: str, host: str | None, key: str) -> str:
    if not host:
        raise PipelineError(f"{key}: {url} has no host")
    if UNSENDABLE.search(url):
        raise PipelineError(f"{key}: {url!r} contains a space, control or non-ASCII character; "
                            "percent-encode it (a space is %20)")
    return url


def _is_there(source: Path, key: str) -> bool:
    """Whether a local source exists; one that exists but is no file is an error, not a reason to skip it."""
    if not source.exists():
        return False
    if source.is_dir():
        raise PipelineError(f"{key}: {source} is a directory, not a file; give the archive's path in it")
    if not source.is_file():
        raise PipelineError(f"{key}: {source} is not a regular file")
    return True


def fetch_first(sources: list[Source]) -> int:
    """Put the first source that is there at ARCHIVE, verified, and return its index.

    Every url is checked before anything is fetched, so a typo in a later source is not hidden by an earlier
    one. A missing file, or a URL that does not answer (after the retries), is skipped with one line; a
    source that is there but fails its md5 or archive check is an error: it is never silently passed over.
    """
    places = [locate(source.url, f"data.sources[{index}].url") for index, source in enumerate(sources)]
    skipped = []
    for index, (source, place) in enumerate(zip(sources, places)):
        key = f"data.sources[{index}]"
        if isinstance(place, Path) and not _is_there(place, f"{key}.url"):
            why = f"{place} does not exist"
        elif is_the_archive(place):  # a copy placed in data/ by hand: checked where it is and left alone
            verify(ARCHIVE, source.md5, source.url, f"{key}.md5")  # a mismatch leaves the user's file where it is
            print(f"download: {key} is {ARCHIVE} itself; verified in place")
            return index
        else:
            try:
                with atomic_output(ARCHIVE) as partial:  # a failure leaves the archive that was there, if any
                    fetch(place, partial)
                    verify(partial, source.md5, source.url, f"{key}.md5")
                return index
            except Unreachable as error:
                why = str(error)
        print(f"download: skipping {key}: {why}")
        skipped.append(f"{key}: {why}")
    raise PipelineError(f"none of data.sources is there ({'; '.join(skipped)}); {NONE_THERE_HINT}")


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
                raise Unreachable(f"{url} answered HTTP {error.code} {error.reason}") from None
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            # HTTPException: an answer that is no HTTP (BadStatusLine) or a chunked body cut short (IncompleteRead)
            if attempt == RETRIES:
                why = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
                raise Unreachable(f"could not download {url} after {RETRIES} tries ({_one_line(why)})") from None
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
        if length is not None and not re.fullmatch(r"\s*[0-9]+\s*", length):
            # http.client reads such a body to the end of the connection; so does this, and the md5 checks it.
            print(f"download: {url} sent a malformed Content-Length {_one_line(length)!r}; reading to the end")
            length = None
        total = have + int(length) if length is not None else None
        with open(destination, mode) as writer, _progress(total, Path(urlparse(url).path).name) as bar:
            bar.update(have)
            while chunk := response.read(CHUNK):
                writer.write(chunk)
                bar.update(len(chunk))
        if total is not None and destination.stat().st_size < total:
            raise ConnectionError("connection closed before the end of the file")


def _one_line(text: object) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 200 else f"{text[:197]}..."


def _progress(total: int | None, name: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, mininterval=1)


def md5_of(path: Path) -> str:
    """The file's md5 as 32 lowercase hex digits, read a chunk at a time."""
    digest = hashlib.md5()
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected_md5: str, source: str, md5_key: str) -> None:
    """Check the checksum (params.yaml's `md5_key`), then that the archive reads to its end and has the
    CIFAR-10 batches."""
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
            f"{source}: md5 {actual} does not match {md5_key} {expected_md5}; the file is {what}. "
            f"Fetch it again, or set {md5_key} if you meant to use this file"
        )
    if problem:
        raise PipelineError(f"{source} is {problem}")
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise PipelineError(f"{source} is not a CIFAR-10 python archive: {missing[0]} is missing")


def is_the_archive(source: str | Path) -> bool:
    """Whether a source names the download stage's own output (dvc.yaml keeps it, as a persist output)."""
    return isinstance(source, Path) and ARCHIVE.exists() and source.samefile(ARCHIVE)
