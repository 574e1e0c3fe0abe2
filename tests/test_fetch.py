"""transfer.fetch called in-process (test_download.py runs the download stage end to end, in a subprocess that
mutation testing cannot see): locating sources, fetching them over real HTTP or from a file, verifying them."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest
from http_server import serve

from transfer import fetch
from transfer.config import Source
from transfer.errors import PipelineError
from transfer.paths import ARCHIVE


def test_md5_of_is_the_files_md5_over_several_chunks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 41  # 10,496 bytes: several chunks of 1,000
    monkeypatch.setattr(fetch, "CHUNK", 1000)
    path = tmp_path / "file"
    path.write_bytes(data)
    assert fetch.md5_of(path) == hashlib.md5(data).hexdigest()


def test_verify_accepts_the_archive_with_its_md5(tiny_archive):
    fetch.verify(tiny_archive, fetch.md5_of(tiny_archive), "the source", "data.sources[0].md5")


def test_verify_names_a_wrong_md5_and_the_key_to_set(tiny_archive):
    with pytest.raises(PipelineError) as error:
        fetch.verify(tiny_archive, "0" * 32, "the source", "data.sources[1].md5")
    assert str(error.value) == (
        f"the source: md5 {fetch.md5_of(tiny_archive)} does not match data.sources[1].md5 {'0' * 32}; the file is "
        "a different file. Fetch it again, or set data.sources[1].md5 if you meant to use this file")


def test_verify_names_a_truncated_archive_even_with_its_own_md5(tiny_archive, tmp_path):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tiny_archive.read_bytes()[: tiny_archive.stat().st_size // 2])
    with pytest.raises(PipelineError) as error:
        fetch.verify(truncated, fetch.md5_of(truncated), "src", "key.md5")
    assert str(error.value) == "src is truncated or corrupt (EOFError)"
    with pytest.raises(PipelineError) as error:
        fetch.verify(truncated, fetch.md5_of(tiny_archive), "src", "key.md5")
    assert "does not match key.md5" in str(error.value) and "the file is truncated or corrupt (EOFError)." in str(
        error.value)


def test_verify_names_the_first_missing_batch(tmp_path):
    other = tmp_path / "other.tar.gz"
    (tmp_path / "data_batch_1").write_bytes(b"x")
    with tarfile.open(other, "w:gz") as archive:
        archive.add(tmp_path / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(PipelineError) as error:
        fetch.verify(other, fetch.md5_of(other), "src", "key.md5")
    assert str(error.value) == "src is not a CIFAR-10 python archive: cifar-10-batches-py/data_batch_2 is missing"


SUPPORTED = "give an http(s) URL, a file:// URL or a local path"
BAD_URLS = {
    "": f" is empty; {SUPPORTED}",
    "  ": f" is empty; {SUPPORTED}",
    "ftp://example.com/cifar.tar.gz": f": ftp://example.com/cifar.tar.gz uses the unsupported scheme ftp; {SUPPORTED}",
    "://cifar.tar.gz": f": ://cifar.tar.gz uses the unsupported scheme (none); {SUPPORTED}",
    "http://": ": http:// has no host",
    "https:///cifar.tar.gz": ": https:///cifar.tar.gz has no host",
    "http://127.0.0.1:99999/c": ": http://127.0.0.1:99999/c is not a valid URL (Port out of range 0-65535)",
    "file://archives/c.tar.gz": ": file://archives/c.tar.gz names the host archives; a file:// URL takes an "
                                "absolute path (file:///path/to/archive), or give the path itself",
    "http://host/my c.tar.gz": ": 'http://host/my c.tar.gz' contains a space, control or non-ASCII character; "
                               "percent-encode it (a space is %20)",
    "http://host/caf\u00e9": ": 'http://host/caf\u00e9' contains a space, control or non-ASCII character; "
                             "percent-encode it (a space is %20)",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
def test_locate_refuses_a_bad_url_with_one_line_naming_its_key(url):
    with pytest.raises(PipelineError) as error:
        fetch.locate(url, "data.sources[3].url")
    assert str(error.value) == f"data.sources[3].url{BAD_URLS[url]}"


def test_locate_tells_urls_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fetch.locate("http://127.0.0.1:8/a%20b.tar.gz", "k") == "http://127.0.0.1:8/a%20b.tar.gz"
    assert fetch.locate("HTTPS://example.com/c", "k") == "HTTPS://example.com/c"
    assert fetch.locate("file:///srv/my%20copy.tar.gz", "k") == Path("/srv/my copy.tar.gz")
    assert fetch.locate("file://localhost/srv/c.tar.gz", "k") == Path("/srv/c.tar.gz")
    assert fetch.locate("copies/c.tar.gz", "k") == tmp_path.resolve() / "copies/c.tar.gz"
    assert fetch.locate("runs:2024/c.tar.gz", "k") == tmp_path.resolve() / "runs:2024/c.tar.gz"
    assert fetch.locate("/abs/c.tar.gz", "k") == Path("/abs/c.tar.gz")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def source(url: str, archive: Path) -> Source:
    return Source(url=url, md5=fetch.md5_of(archive))


def test_fetch_first_copies_the_first_source_that_is_there(project, tiny_archive, capsys):
    (project / "copy.tar.gz").write_bytes(tiny_archive.read_bytes())
    index = fetch.fetch_first([source("nowhere/c.tar.gz", tiny_archive), source("copy.tar.gz", tiny_archive)])
    assert index == 1 and fetch.md5_of(ARCHIVE) == fetch.md5_of(tiny_archive)
    assert capsys.readouterr().out.splitlines() == [
        f"download: skipping data.sources[0]: {project.resolve() / 'nowhere/c.tar.gz'} does not exist"]
    assert sorted(path.name for path in (project / "data").iterdir()) == [ARCHIVE.name]


def test_fetch_first_refuses_a_source_that_is_there_with_another_md5(project, tiny_archive):
    wrong = Source(url=str(tiny_archive), md5="0" * 32)
    with pytest.raises(PipelineError) as error:
        fetch.fetch_first([wrong, source(str(tiny_archive), tiny_archive)])
    assert str(error.value).startswith(f"{tiny_archive}: md5 {fetch.md5_of(tiny_archive)} does not match "
                                       f"data.sources[0].md5 {'0' * 32}; the file is a different file")
    assert list((project / "data").iterdir()) == []
    ARCHIVE.write_bytes(tiny_archive.read_bytes())  # placed by hand: verified in place, and kept when it fails
    with pytest.raises(PipelineError) as error:
        fetch.fetch_first([Source(url=str(ARCHIVE), md5="1" * 32)])
    assert str(error.value).startswith(f"{ARCHIVE}: md5 {fetch.md5_of(tiny_archive)} does not match "
                                       f"data.sources[0].md5 {'1' * 32}; the file is a different file. Fetch it "
                                       "again, or set data.sources[0].md5 if you meant to use this file")
    assert ARCHIVE.read_bytes() == tiny_archive.read_bytes()


def test_fetch_first_refuses_a_typo_in_a_later_source_before_fetching(project, tiny_archive):
    with pytest.raises(PipelineError, match=r"^data.sources\[1\].url: ftp://x/c uses the unsupported scheme ftp"):
        fetch.fetch_first([source(str(tiny_archive), tiny_archive), source("ftp://x/c", tiny_archive)])
    assert not (project / "data").exists()


def test_fetch_first_refuses_a_directory_or_a_fifo(project, tiny_archive):
    (project / "downloads").mkdir()
    with pytest.raises(PipelineError) as error:
        fetch.fetch_first([source("downloads", tiny_archive)])
    assert str(error.value) == (f"data.sources[0].url: {project.resolve() / 'downloads'} is a directory, not a file; "
                                "give the archive's path in it")
    os.mkfifo(project / "fifo")
    with pytest.raises(PipelineError) as error:
        fetch.fetch_first([source("fifo", tiny_archive)])
    assert str(error.value) == f"data.sources[0].url: {project.resolve() / 'fifo'} is not a regular file"


def test_fetch_first_verifies_the_archive_in_place(project, tiny_archive, capsys):
    ARCHIVE.parent.mkdir()
    ARCHIVE.write_bytes(tiny_archive.read_bytes())
    before = ARCHIVE.stat().st_mtime_ns
    assert fetch.fetch_first([source("nowhere", tiny_archive), source(str(ARCHIVE), tiny_archive)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"download: data.sources[1] is {ARCHIVE} itself; verified in place")
    assert ARCHIVE.stat().st_mtime_ns == before
    assert fetch.is_the_archive(project.resolve() / ARCHIVE) and not fetch.is_the_archive(str(ARCHIVE))
    assert not fetch.is_the_archive(tiny_archive)


def test_none_there_lists_every_source_tried(project, tiny_archive):
    with serve({}) as server:  # 404: not retried
        url = f"{server.url}/c.tar.gz"
        with pytest.raises(PipelineError) as error:
            fetch.fetch_first([source("nowhere", tiny_archive), source(url, tiny_archive)])
    assert str(error.value) == (
        f"none of data.sources is there (data.sources[0]: {project.resolve() / 'nowhere'} does not exist; "
        f"data.sources[1]: {url} answered HTTP 404 Not Found); {fetch.NONE_THERE_HINT}")
    assert fetch.NONE_THERE_HINT == "add a copy you have to data.sources, with its md5 (docs/troubleshooting.md)"


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The back-off waits between tries, recorded instead of slept (the retry logic is what is tested)."""
    waited: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waited.append)
    return waited


def test_a_flaky_server_is_retried_with_backoff_and_resumed(project, tiny_archive, waits, capsys):
    with serve({"c.tar.gz": tiny_archive}, faults=["drop", "503", "not http", "ok"]) as server:
        assert fetch.fetch_first([source(f"{server.url}/c.tar.gz", tiny_archive)]) == 0
    assert fetch.md5_of(ARCHIVE) == fetch.md5_of(tiny_archive) and waits == [0.5, 1.0, 2.0]
    ranges = [request["range"] for request in server.requests]
    half = tiny_archive.stat().st_size // 2
    assert ranges == [None, f"bytes={half}-", f"bytes={half}-", f"bytes={half}-"]  # resumed, never restarted
    assert capsys.readouterr().out.splitlines() == [
        "download: ConnectionError, retrying in 0 s (try 2/5)", "download: HTTP 503, retrying in 1 s (try 3/5)",
        "download: BadStatusLine, retrying in 2 s (try 4/5)"]
    assert sorted(path.name for path in (project / "data").iterdir()) == [ARCHIVE.name]


def test_a_server_that_ignores_range_is_read_from_the_start(tiny_archive, tmp_path):
    """Python's own file server answers a Range request with the whole file (200): nothing is appended."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tiny_archive.parent))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    destination = tmp_path / "partial"
    destination.write_bytes(b"a start that is not the file's")
    try:
        fetch._download_remaining(f"http://127.0.0.1:{httpd.server_address[1]}/{tiny_archive.name}", destination)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert destination.read_bytes() == tiny_archive.read_bytes()


def test_five_failures_skip_the_source_with_one_line(project, tiny_archive, waits, capsys):
    with serve({"c.tar.gz": tiny_archive}, faults=["503"] * 5) as server:
        url = f"{server.url}/c.tar.gz"
        assert fetch.fetch_first([source(url, tiny_archive), source(str(tiny_archive), tiny_archive)]) == 1
    assert waits == [0.5, 1.0, 2.0, 4.0] and len(server.requests) == 5
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"download: skipping data.sources[0]: {url} answered HTTP 503 Service Unavailable")


def test_an_answer_that_is_never_http_names_the_last_error(project, tiny_archive, waits, capsys):
    with serve({"c.tar.gz": tiny_archive}, faults=["not http"] * 5) as server:
        url = f"{server.url}/c.tar.gz"
        with pytest.raises(PipelineError) as error:
            fetch.fetch_first([source(url, tiny_archive)])
    assert f"data.sources[0]: could not download {url} after 5 tries (BadStatusLine: HELLO THERE)" in str(error.value)
    assert not ARCHIVE.exists() and list((project / "data").iterdir()) == []


def test_a_malformed_content_length_is_read_to_the_end(project, tiny_archive, waits, capsys):
    with serve({"c.tar.gz": tiny_archive}, faults=["bad length"]) as server:
        url = f"{server.url}/c.tar.gz"
        fetch.fetch(url, project / "out")
    assert (project / "out").read_bytes() == tiny_archive.read_bytes() and waits == []
    assert f"download: {url} sent a malformed Content-Length '12 bytes'; reading to the end" in capsys.readouterr().out


def test_a_local_copy_is_copied_whole_over_several_chunks(project, tiny_archive, monkeypatch):
    monkeypatch.setattr(fetch, "CHUNK", 1000)
    fetch.fetch(tiny_archive, project / "out")
    assert (project / "out").read_bytes() == tiny_archive.read_bytes()


def test_one_line_joins_and_shortens(project):
    assert fetch._one_line("a\n  b\tc") == "a b c"
    assert fetch._one_line("x" * 200) == "x" * 200
    assert fetch._one_line("x" * 201) == "x" * 197 + "..."


def test_a_500_is_retried_and_a_404_is_not(project, tiny_archive, waits):
    with serve({"c.tar.gz": tiny_archive}, faults=["500", "ok"]) as server:
        fetch.fetch(f"{server.url}/c.tar.gz", project / "out")
        assert (project / "out").read_bytes() == tiny_archive.read_bytes() and waits == [0.5]
        with pytest.raises(fetch.Unreachable) as error:
            fetch.fetch(f"{server.url}/missing", project / "out")
    assert str(error.value) == f"{server.url}/missing answered HTTP 404 Not Found" and waits == [0.5]


def test_a_closed_port_is_named_by_the_reason_of_the_last_try(project, waits):
    with serve({}) as server:
        url = f"{server.url}/c.tar.gz"  # the port is closed once the server stops
    with pytest.raises(fetch.Unreachable) as error:
        fetch.fetch(url, project / "out")
    assert str(error.value) == f"could not download {url} after 5 tries ([Errno 111] Connection refused)"
    assert waits == [0.5, 1.0, 2.0, 4.0]


def test_a_tar_that_is_not_gzipped_is_refused_even_with_its_md5(tiny_archive, tmp_path):
    import gzip

    plain = tmp_path / "plain.tar"
    plain.write_bytes(gzip.decompress(tiny_archive.read_bytes()))  # the same members, uncompressed
    with pytest.raises(PipelineError) as error:
        fetch.verify(plain, fetch.md5_of(plain), "src", "key.md5")
    assert str(error.value) == "src is truncated or corrupt (ReadError)"


def test_the_progress_bar_names_the_file_and_counts_bytes_in_kibibytes(project, tiny_archive, waits, capsys):
    from tqdm import tqdm

    with serve({"c.tar.gz": tiny_archive}) as server:
        fetch.fetch(f"{server.url}/c.tar.gz", project / "out")
    size = tqdm.format_sizeof(tiny_archive.stat().st_size, divisor=1024)  # bytes in kibibytes: "25.4k"
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("c.tar.gz: 100%|") and f"| {size}/{size} [" in last and last.endswith("B/s]\n"), last
    fetch.fetch(tiny_archive, project / "copy")
    assert f"{tiny_archive.name}: 100%" in capsys.readouterr().err


def test_a_connection_dropped_every_time_is_named(project, tiny_archive, waits):
    with serve({"c.tar.gz": tiny_archive}, faults=["drop"] * 5) as server:
        url = f"{server.url}/c.tar.gz"
        with pytest.raises(fetch.Unreachable) as error:
            fetch.fetch(url, project / "out")
    assert str(error.value) == (f"could not download {url} after 5 tries (ConnectionError: connection closed before "
                                "the end of the file)")
