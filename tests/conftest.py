from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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

# The suite runs on two pytest-xdist workers (pyproject.toml), one module at a time each (--dist loadscope: a
# module's tests share its fixtures and some run in order). Modules start in this order, the longest first, so
# that neither worker is left with a long one at the end while the other idles; the others follow by name.
LONGEST_FIRST = ("test_faults.py", "test_gpu_settings.py", "test_label_efficiency.py", "test_warm_head.py",
                 "test_experiments.py", "test_workflow.py", "test_models.py", "test_batchnorm.py", "test_distribute.py",
                 "test_reproducibility.py", "test_readme_cpu_profile.py", "test_reference_resolution.py",
                 "test_live.py", "test_checkpoints.py", "test_kept_epoch.py", "test_pipeline.py",
                 "test_packaging.py", "test_model_product.py", "test_records.py", "test_resize.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module keeps its own order


class Finished(NamedTuple):
    project: Path
    repro: subprocess.CompletedProcess  # its one `dvc repro`


# The tiny archive and its HTTP server live in the process that runs the suite: the xdist controller, or pytest
# itself without workers. Every worker reads the same archive file and the same URL, so the one finished project
# (finished_project) is built once per run whichever worker needs it first, and its data source stays reachable
# for the whole run.
def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    folder = Path(tempfile.mkdtemp(prefix="pytest-tiny-cifar-"))
    archive = write_learnable_archive(folder / "cifar-10-python.tar.gz")
    server = serve({"cifar-10-python.tar.gz": archive})
    config.stash[_SHARED] = {"archive": str(archive), "url": server.__enter__().url}
    owner = os.getpid()  # a process forked from this one (mutmut's workers) leaves the archive to its owner

    def cleanup() -> None:
        if os.getpid() == owner:
            server.__exit__(None, None, None)
            shutil.rmtree(folder, ignore_errors=True)

    config.stash[_CLEANUP] = cleanup


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist's hook, in the controller: what each worker is handed
    node.workerinput["tiny"] = node.config.stash[_SHARED]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CLEANUP in config.stash:
        config.stash[_CLEANUP]()


_SHARED = pytest.StashKey[dict]()
_CLEANUP = pytest.StashKey[object]()


def _shared(config: pytest.Config) -> dict:
    return config.workerinput["tiny"] if hasattr(config, "workerinput") else config.stash[_SHARED]


class _ArchiveServer(NamedTuple):
    url: str


@pytest.fixture(scope="session")
def tiny_archive(pytestconfig) -> Path:
    """12 training and 4 test images per class, official layout."""
    return Path(_shared(pytestconfig)["archive"])


@pytest.fixture(scope="session")
def archive_server(pytestconfig) -> _ArchiveServer:
    """tiny_archive over HTTP on 127.0.0.1, for the whole run: finished_project's data source stays reachable."""
    return _ArchiveServer(_shared(pytestconfig)["url"])


@pytest.fixture(scope="session")
def finished_project(pytestconfig, tmp_path_factory, tiny_archive, archive_server) -> Finished:
    """The tiny project after one `dvc repro` from scratch (downloading over HTTP from 127.0.0.1), built once
    per test run (by the first xdist worker that needs it, in the workers' common temporary folder). Tests never
    change it: they take a copy (helpers.copy_project), which DVC sees up to date."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(pytestconfig, "workerinput"):
        root = root.parent  # the workers' common folder
    project, record = root / "finished" / "p", root / "finished" / "repro.json"
    with open(root / "finished.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the build, then takes it
        if not record.is_file():
            shutil.rmtree(project.parent, ignore_errors=True)  # a build that failed half way
            make_project(project, tiny_archive,
                         {"data.sources.0.url": f"{archive_server.url}/cifar-10-python.tar.gz", **FINISHED})
            result = run(["dvc", "repro"], project)
            record.write_text(json.dumps([result.args, result.returncode, result.stdout, result.stderr]))
    return Finished(project, subprocess.CompletedProcess(*json.loads(record.read_text())))
