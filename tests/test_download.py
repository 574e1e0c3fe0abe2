"""The download stage against a real HTTP server on 127.0.0.1 and local files."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import last_line, make_project, md5_of, run_stage, set_params
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
        set_params(project / "params.yaml", {"data.url": f"{server.url}/cifar.tar.gz"})
        result = run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    assert "verified" in result.stdout
    assert leftovers(project) == [ARCHIVE.name]


def test_flaky_server_is_retried_and_resumed(project, tiny_archive):
    with serve({"cifar.tar.gz": tiny_archive}, faults=["drop", "503", "ok"]) as server:
        set_params(project / "params.yaml", {"data.url": f"{server.url}/cifar.tar.gz"})
        run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)
    first, second, third = server.requests
    assert first["range"] is None
    assert second["range"] is not None and third["range"] == second["range"]  # resumed, not restarted
    assert int(third["range"][6:].rstrip("-")) > 0


def test_local_relative_path_and_file_url(project, tiny_archive):
    (project / "copy.tar.gz").write_bytes(tiny_archive.read_bytes())
    set_params(project / "params.yaml", {"data.url": "copy.tar.gz"})
    run_stage("download", project, check=True)
    set_params(project / "params.yaml", {"data.url": f"file://{tiny_archive}"})
    run_stage("download", project, check=True)
    assert md5_of(project / ARCHIVE) == md5_of(tiny_archive)


def test_wrong_md5_fails_and_leaves_nothing(project):
    set_params(project / "params.yaml", {"data.md5": "0" * 32})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert "does not match data.md5 00000000000000000000000000000000" in last_line(result)
    assert leftovers(project) == []


def test_truncated_archive_is_named(project, tiny_archive, tmp_path):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tiny_archive.read_bytes()[: tiny_archive.stat().st_size // 2])
    # Even with the md5 of the truncated file itself, the archive check refuses it.
    set_params(project / "params.yaml", {"data.url": str(truncated), "data.md5": md5_of(truncated)})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert str(truncated) in last_line(result) and "truncated or corrupt" in last_line(result)
    assert leftovers(project) == []
    set_params(project / "params.yaml", {"data.md5": md5_of(tiny_archive)})
    result = run_stage("download", project)
    assert "does not match" in last_line(result) and "truncated or corrupt" in last_line(result)


def test_archive_that_is_not_cifar(project, tmp_path):
    import tarfile

    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as archive:
        archive.add(project / "params.yaml", arcname="params.yaml")
    set_params(project / "params.yaml", {"data.url": str(other), "data.md5": md5_of(other)})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert f"{other} is not a CIFAR-10 python archive" in last_line(result)


def test_unreachable_url_says_to_use_a_local_copy(project):
    with serve({}) as server:
        dead_url = server.url  # the port is closed once the server stops
    set_params(project / "params.yaml", {"data.url": f"{dead_url}/cifar.tar.gz"})
    result = run_stage("download", project)
    assert result.returncode == 1
    line = last_line(result)
    assert f"{dead_url}/cifar.tar.gz" in line and "point data.url at a local copy" in line
    assert leftovers(project) == []


def test_missing_local_file(project):
    set_params(project / "params.yaml", {"data.url": "nowhere/cifar.tar.gz"})
    result = run_stage("download", project)
    assert result.returncode == 1
    assert "nowhere/cifar.tar.gz does not exist" in last_line(result)
