from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import FINISHED, make_project, run, write_learnable_archive  # noqa: E402
from http_server import serve  # noqa: E402

# A shell that starts the suite in the background without job control (`pytest &` in a script, nohup) makes it
# ignore SIGINT, and ignored signals survive exec: the stages the tests start would then never see the Ctrl-C the
# fault tests send them. A handler, unlike SIG_IGN, is reset to the default on exec, so every stage starts as
# under a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Finished(NamedTuple):
    project: Path
    repro: subprocess.CompletedProcess  # its one `dvc repro`


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    """12 training and 4 test images per class, official layout."""
    return write_learnable_archive(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz")


@pytest.fixture(scope="session")
def archive_server(tiny_archive):
    """tiny_archive over HTTP on 127.0.0.1, for the whole run: finished_project's data source stays reachable."""
    with serve({"cifar-10-python.tar.gz": tiny_archive}) as server:
        yield server


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory, tiny_archive, archive_server) -> Finished:
    """The tiny project after one `dvc repro` from scratch (downloading over HTTP from 127.0.0.1), built once
    per test run. Tests never change it: they take a copy (helpers.copy_project), which DVC sees up to date."""
    project = make_project(tmp_path_factory.mktemp("finished") / "p", tiny_archive,
                           {"data.sources.0.url": f"{archive_server.url}/cifar-10-python.tar.gz", **FINISHED})
    return Finished(project, run(["dvc", "repro"], project))
