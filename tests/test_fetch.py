"""transfer.fetch called in-process (test_download.py runs the download stage end to end, in a subprocess that
mutation testing cannot see): locating sources, fetching them over real HTTP or from a file, verifying them."""

from __future__ import annotations

import hashlib

import pytest

from transfer import fetch
from transfer.errors import PipelineError


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
