"""The download stage against a real HTTP server on 127.0.0.1 and local files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    environment,
    last_line,
    make_project,
    md5_of,
    repickle,
    run,
    run_stage,
    set_params,
    sources,
    write_learnable_archive,
)
from http_server import serve

ARCHIVE = Path("data/cifar-10-python.tar.gz")


@pytest.fixture
def project(tmp_path, tiny_archive) -> Path:
    return make_project(tmp_path / "project", tiny_archive, git=False)


def leftovers(project: Path) -> list[str]:
    data = project / "data"
    return sorted(p.name for p in data.iterdir()) if data.exists() else []


def test_http_download_is_verified_and_kept(project, tiny_archive):
    with serve({"cifar.tar.gz": tiny_archive}) as server:
        set_params(project / "params.yaml", {"data.sources.0.url": f"{server.url}/cifar.tar.gz"})
        result = run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    assert "verified" in result.stdout
    assert leftovers(project) == [ARCHIVE.name]


def test_flaky_server_is_retried_and_resumed(project, tiny_archive):
    with serve({"cifar.tar.gz": tiny_archive}, faults=["drop", "503", "ok"]) as server:
        set_params(project / "params.yaml", {"data.sources.0.url": f"{server.url}/cifar.tar.gz"})
        run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    first, second, third = server.requests
    assert first["range"] is None
    assert second["range"] is not None and third["range"] == second["range"]  # resumed, not restarted
    assert int(third["range"][6:].rstrip("-")) > 0


def test_answers_that_are_no_http_are_retried(project, tiny_archive):
    """http.client raises HTTPException, no OSError, for these: they escaped as tracebacks."""
    with serve({"cifar.tar.gz": tiny_archive}, faults=["not http", "chunked cut", "ok"]) as server:
        set_params(project / "params.yaml", {"data.sources.0.url": f"{server.url}/cifar.tar.gz"})
        result = run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    assert [line for line in result.stdout.splitlines() if "retrying" in line] == [
        "download: BadStatusLine, retrying in 0 s (try 2/5)", "download: IncompleteRead, retrying in 1 s (try 3/5)"]
    assert [request["fault"] for request in server.requests] == ["not http", "chunked cut", "ok"]


def test_an_answer_that_is_never_http_is_skipped_with_one_line(project, tiny_archive):
    with serve({"cifar.tar.gz": tiny_archive}, faults=["not http"] * 5) as server:
        url = f"{server.url}/cifar.tar.gz"
        set_params(project / "params.yaml", {"data.sources": sources((url, tiny_archive), tiny_archive)})
        result = run_stage("download", project, check=True)
    assert (f"download: skipping data.sources[0]: could not download {url} after 5 tries (BadStatusLine: "
            "HELLO THERE)" in result.stdout.splitlines()), result.stdout
    assert record(project)["source"] == 1 and "Traceback" not in result.stderr


def test_a_malformed_content_length_is_read_to_the_end(project, tiny_archive):
    with serve({"cifar.tar.gz": tiny_archive}, faults=["bad length"]) as server:
        url = f"{server.url}/cifar.tar.gz"
        set_params(project / "params.yaml", {"data.sources.0.url": url})
        result = run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    assert f"download: {url} sent a malformed Content-Length '12 bytes'; reading to the end" in result.stdout


def test_local_relative_path_and_file_url(project, tiny_archive):
    (project / "copy.tar.gz").write_bytes(tiny_archive.read_bytes())
    set_params(project / "params.yaml", {"data.sources.0.url": "copy.tar.gz"})
    run_stage("download", project, check=True)
    set_params(project / "params.yaml", {"data.sources.0.url": f"file://{tiny_archive}"})
    run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)


def test_wrong_md5_fails_and_leaves_nothing(project):
    set_params(project / "params.yaml", {"data.sources.0.md5": "0" * 32})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert "does not match data.sources[0].md5 00000000000000000000000000000000" in last_line(result)
    assert leftovers(project) == []


def test_truncated_archive_is_named(project, tiny_archive, tmp_path):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tiny_archive.read_bytes()[: tiny_archive.stat().st_size // 2])
    # Even with the md5 of the truncated file itself, the archive check refuses it.
    set_params(project / "params.yaml", {"data.sources": sources(truncated)})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert str(truncated) in last_line(result) and "truncated or corrupt" in last_line(result)
    assert leftovers(project) == []
    set_params(project / "params.yaml", {"data.sources.0.md5": md5_of(tiny_archive)})
    result = run_stage("download", project)
    assert "does not match" in last_line(result) and "truncated or corrupt" in last_line(result)


def test_archive_that_is_not_cifar(project, tmp_path):
    import tarfile

    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as archive:
        archive.add(project / "params.yaml", arcname="params.yaml")
    set_params(project / "params.yaml", {"data.sources": sources(other)})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert f"{other} is not a CIFAR-10 python archive" in last_line(result)


# data.sources, tried in order: the two archives hold the same images in different bytes (another pickle protocol).
@pytest.fixture(scope="module")
def repickled_archive(tmp_path_factory, tiny_archive) -> Path:
    return repickle(tiny_archive, tmp_path_factory.mktemp("repickled") / "cifar-10-python.tar.gz")


def record(project: Path) -> dict:
    return json.loads((project / "metrics/download.json").read_text())


def test_a_missing_local_copy_is_skipped_for_the_next_source(project, tiny_archive, repickled_archive):
    """A fresh clone with no ../shared beside it: the official URL (a local server standing in) is used."""
    with serve({"cifar-10-python.tar.gz": repickled_archive}) as server:
        url = f"{server.url}/cifar-10-python.tar.gz"
        set_params(project / "params.yaml", {"data.sources": sources(
            ("../shared/datasets/cifar-10-python.tar.gz", tiny_archive), (url, repickled_archive))})
        result = run_stage("download", project, check=True)
    missing = project / "../shared/datasets/cifar-10-python.tar.gz"  # relative paths: from the project root
    assert f"download: skipping data.sources[0]: {missing} does not exist" in result.stdout.splitlines()
    assert [request["path"] for request in server.requests] == ["/cifar-10-python.tar.gz"]
    assert md5_of(project / ARCHIVE) == md5_of(repickled_archive)
    assert record(project) == {"source": 1, "url": url, "md5": md5_of(repickled_archive)}
    assert leftovers(project) == [ARCHIVE.name]


def test_with_the_local_copy_nothing_is_fetched(project, tiny_archive, repickled_archive):
    with serve({"cifar-10-python.tar.gz": repickled_archive}) as server:
        set_params(project / "params.yaml", {"data.sources": sources(
            tiny_archive, (f"{server.url}/cifar-10-python.tar.gz", repickled_archive))})
        result = run_stage("download", project, check=True)
    assert server.requests == []
    assert "skipping" not in result.stdout
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    assert record(project) == {"source": 0, "url": str(tiny_archive), "md5": md5_of(tiny_archive)}


def test_a_present_source_with_another_md5_is_an_error_not_skipped(project, tiny_archive, repickled_archive):
    with serve({"cifar-10-python.tar.gz": repickled_archive}) as server:
        set_params(project / "params.yaml", {"data.sources": [
            {"url": str(tiny_archive), "md5": md5_of(repickled_archive)},  # the other copy's md5
            *sources((f"{server.url}/cifar-10-python.tar.gz", repickled_archive))]})
        result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result) == (
        f"error: {tiny_archive}: md5 {md5_of(tiny_archive)} does not match data.sources[0].md5 "
        f"{md5_of(repickled_archive)}; the file is a different file. Fetch it again, or set data.sources[0].md5 "
        "if you meant to use this file")
    assert server.requests == [] and leftovers(project) == []


def test_an_unreachable_url_is_skipped(project, tiny_archive):
    with serve({}) as server:  # answers 404 Not Found, which is not retried
        set_params(project / "params.yaml", {"data.sources": sources(
            (f"{server.url}/cifar-10-python.tar.gz", tiny_archive), tiny_archive)})
        result = run_stage("download", project, check=True)
    assert (f"download: skipping data.sources[0]: {server.url}/cifar-10-python.tar.gz answered HTTP 404 Not Found"
            in result.stdout.splitlines())
    assert record(project)["source"] == 1 and md5_of(project / ARCHIVE) == md5_of(tiny_archive)


def test_with_no_source_there_one_line_lists_what_was_tried(project, tiny_archive):
    with serve({}) as server:
        dead_url = f"{server.url}/cifar.tar.gz"  # the port is closed once the server stops
    set_params(project / "params.yaml", {"data.sources": sources(("nowhere/cifar.tar.gz", tiny_archive),
                                                                 (dead_url, tiny_archive))})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result) == (
        f"error: none of data.sources is there (data.sources[0]: {project / 'nowhere/cifar.tar.gz'} does not exist; "
        f"data.sources[1]: could not download {dead_url} after 5 tries ([Errno 111] Connection refused)); "
        "add a copy you have to data.sources, with its md5 (docs/troubleshooting.md)")
    assert result.stdout.count("download: skipping") == 2
    assert leftovers(project) == [] and not (project / "metrics/download.json").exists()


def test_a_typo_in_a_later_source_is_refused_before_anything_is_fetched(project, tiny_archive):
    set_params(project / "params.yaml", {"data.sources": sources(tiny_archive, ("ftp://example.com/c.tar.gz",
                                                                                tiny_archive))})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result).startswith("error: data.sources[1].url: ftp://example.com/c.tar.gz uses the unsupported")
    assert leftovers(project) == []


# Bad values of a source's url: each is one line naming its key, at once (no retries), and leaves nothing under data/.
SUPPORTED = "give an http(s) URL, a file:// URL or a local path"
BAD_URLS = {
    "ftp://example.com/cifar.tar.gz": f"uses the unsupported scheme ftp; {SUPPORTED}",
    "://cifar.tar.gz": f"uses the unsupported scheme (none); {SUPPORTED}",
    "http://": "has no host",
    "https:///cifar.tar.gz": "has no host",
    "http://127.0.0.1:notaport/cifar.tar.gz": "is not a valid URL (Port could not be cast to integer value as "
                                              "'notaport')",
    "http://127.0.0.1:99999/cifar.tar.gz": "is not a valid URL (Port out of range 0-65535)",
    "http://[::1/cifar.tar.gz": "is not a valid URL (Invalid IPv6 URL)",
    "file://archives/cifar.tar.gz": "names the host archives; a file:// URL takes an absolute path "
                                    "(file:///path/to/archive), or give the path itself",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
def test_malformed_or_unsupported_url(project, url):
    set_params(project / "params.yaml", {"data.sources.0.url": url})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result) == f"error: data.sources[0].url: {url} {BAD_URLS[url]}"
    assert "retrying" not in result.stdout
    assert leftovers(project) == []


def test_url_with_a_space_is_refused_before_any_request(project, tiny_archive):
    with serve({"my cifar.tar.gz": tiny_archive}) as server:
        url = f"{server.url}/my cifar.tar.gz"
        set_params(project / "params.yaml", {"data.sources.0.url": url})
        result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result) == (f"error: data.sources[0].url: {url!r} contains a space, control or non-ASCII "
                                 "character; percent-encode it (a space is %20)")
    assert server.requests == [] and leftovers(project) == []


def test_empty_url(project):
    set_params(project / "params.yaml", {"data.sources.0.url": ""})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result) == f"error: data.sources[0].url is empty; {SUPPORTED}"
    assert leftovers(project) == []


def test_directory_is_not_a_file(project, tiny_archive):
    (project / "downloads").mkdir()
    (project / "downloads" / ARCHIVE.name).write_bytes(tiny_archive.read_bytes())
    set_params(project / "params.yaml", {"data.sources.0.url": "downloads"})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert last_line(result) == (f"error: data.sources[0].url: {project / 'downloads'} is a directory, not a file; "
                                 "give the archive's path in it")
    assert leftovers(project) == []


def test_fifo_is_not_a_regular_file(project, tmp_path):
    fifo = tmp_path / "cifar.tar.gz"
    os.mkfifo(fifo)
    set_params(project / "params.yaml", {"data.sources.0.url": str(fifo)})
    # Reading a FIFO nobody writes to blocks for ever: the timeout turns that into a failure.
    result = subprocess.run([sys.executable, "-m", "stages.download"], cwd=project, capture_output=True, text=True,
                            env=environment(), timeout=60)
    assert result.returncode == 1
    assert last_line(result) == f"error: data.sources[0].url: {fifo} is not a regular file"
    assert leftovers(project) == []


def test_md5_in_capitals(project, tiny_archive):
    set_params(project / "params.yaml", {"data.sources.0.md5": md5_of(tiny_archive).upper()})
    result = run_stage("download", project, check=True)
    assert f"(md5 {md5_of(tiny_archive)})" in result.stdout
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)


# A source naming the stage's own output. DVC deletes a stage's outputs before running it unless they are
# `persist`; these run the real `dvc repro`, which is what used to delete the user's copy.
@pytest.fixture
def dvc_project(tmp_path, tiny_archive) -> Path:
    return make_project(tmp_path / "dvc_project", tiny_archive)


@pytest.fixture(scope="module")
def other_archive(tmp_path_factory) -> Path:
    """A valid CIFAR-10 archive with another md5 than tiny_archive."""
    return write_learnable_archive(tmp_path_factory.mktemp("other") / "cifar-10-python.tar.gz", test_per_class=5)


def stage_errors(result: subprocess.CompletedProcess) -> list[str]:
    """The stage's own error lines in `dvc repro`'s stderr (DVC adds its own ERROR line after them)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_archive_placed_by_hand_is_kept_and_the_pipeline_goes_on(dvc_project, tiny_archive):
    (dvc_project / "data").mkdir()
    shutil.copy(tiny_archive, dvc_project / ARCHIVE)
    set_params(dvc_project / "params.yaml", {"data.sources.0.url": str(ARCHIVE)})
    result = run(["dvc", "repro", "split"], dvc_project)
    assert f"download: data.sources[0] is {ARCHIVE} itself; verified in place" in result.stdout
    assert "Running stage 'split'" in result.stdout
    assert md5_of(dvc_project / ARCHIVE) == md5_of(tiny_archive)
    assert leftovers(dvc_project) == [ARCHIVE.name, "split"]
    again = run(["dvc", "repro", "split"], dvc_project)
    assert "Running stage" not in again.stdout  # persist does not make the stage rerun for ever


def test_archive_placed_by_hand_with_another_md5_is_refused_and_kept(dvc_project, tiny_archive):
    (dvc_project / "data").mkdir()
    shutil.copy(tiny_archive, dvc_project / ARCHIVE)
    set_params(dvc_project / "params.yaml", {"data.sources.0.url": f"file://{dvc_project / ARCHIVE}",
                                             "data.sources.0.md5": "0" * 32})
    result = run(["dvc", "repro", "download"], dvc_project, check=False)
    assert result.returncode != 0
    assert stage_errors(result) == [
        f"error: file://{dvc_project / ARCHIVE}: md5 {md5_of(tiny_archive)} does not match data.sources[0].md5 "
        f"{'0' * 32}; the file is a different file. Fetch it again, or set data.sources[0].md5 if you meant to use "
        "this file"]
    assert md5_of(dvc_project / ARCHIVE) == md5_of(tiny_archive)
    assert leftovers(dvc_project) == [ARCHIVE.name]


def test_stale_archive_is_replaced_whole_or_not_at_all(dvc_project, tiny_archive, other_archive):
    run(["dvc", "repro", "download"], dvc_project)  # data.sources: [tiny_archive]
    other = other_archive.read_bytes()
    with serve({"other.tar.gz": other[: len(other) // 2]}) as server:
        set_params(dvc_project / "params.yaml", {"data.sources": sources((f"{server.url}/other.tar.gz",
                                                                                  other_archive))})
        failed = run(["dvc", "repro", "download"], dvc_project, check=False)
    assert failed.returncode != 0 and "truncated or corrupt" in stage_errors(failed)[0]
    assert md5_of(dvc_project / ARCHIVE) == md5_of(tiny_archive)  # the previous archive, whole
    assert leftovers(dvc_project) == [ARCHIVE.name]
    with serve({"other.tar.gz": other}) as server:
        set_params(dvc_project / "params.yaml", {"data.sources.0.url": f"{server.url}/other.tar.gz"})
        run(["dvc", "repro", "download"], dvc_project)
    assert md5_of(dvc_project / ARCHIVE) == md5_of(other_archive)
    assert leftovers(dvc_project) == [ARCHIVE.name]
