"""Interrupted stages, with real processes: kill -9 and Ctrl-C, then rerun.

A killed run must leave nothing that looks finished, and the rerun must
continue from the last finished epoch (training) or start clean (preprocess).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import finish, make_project, run, set_params, start, write_learnable_archive

from transfer.records import check_shards, open_split

EPOCHS = 5
INTERRUPTED = "error: interrupted; nothing was recorded as done, rerun `dvc repro`"


def wait_until(condition: Callable[[], object], process, what: str, timeout: float = 240) -> None:
    """Poll until `condition` holds; fail (and stop `process`) if the process ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            result = finish(process)
            pytest.fail(f"never saw {what}; exit code {result.returncode}\n{result.stdout}\n{result.stderr}")
        time.sleep(0.02)


def epochs_checkpointed(folder: Path) -> int:
    state = folder / "latest" / "state.json"
    return len(json.loads(state.read_text())["history"]) if state.is_file() else 0


def history_epochs(project: Path, stage: str) -> list[int]:
    rows = (project / f"metrics/{stage}_history.csv").read_text().splitlines()[1:]
    return [int(float(row.split(",")[0])) for row in rows]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project with TFRecords ready and enough images that an epoch takes a moment."""
    folder = tmp_path_factory.mktemp("faults")
    archive = write_learnable_archive(folder / "cifar-10-python.tar.gz", train_per_class=60, test_per_class=10)
    project = make_project(folder / "p", archive, {
        "pretrain.epochs": EPOCHS, "finetune.epochs": EPOCHS, "finetune.cache_features": False,
    })
    run(["dvc", "repro", "preprocess"], project)
    return project


def test_pretrain_killed_mid_epoch_resumes_and_finishes(project):
    checkpoints = project / "checkpoints/pretrain"
    job = start(["dvc", "repro", "pretrain"], project)
    wait_until(lambda: epochs_checkpointed(checkpoints) >= 1, job, "a checkpointed epoch")
    os.killpg(job.pid, signal.SIGKILL)  # dvc and the stage, as a pre-empted machine would
    finish(job)
    done = epochs_checkpointed(checkpoints)
    assert 1 <= done < EPOCHS
    assert not (project / "models/pretrained.keras").exists()

    result = run(["dvc", "repro", "pretrain"], project)
    assert f"resuming from checkpoints/pretrain after epoch {done}" in result.stdout
    assert history_epochs(project, "pretrain") == list(range(1, EPOCHS + 1))
    assert json.loads((project / "metrics/pretrain.json").read_text())["epochs"] == EPOCHS
    assert "modified" not in run(["dvc", "status", "pretrain"], project).stdout


def test_changed_param_discards_the_checkpoint(project):
    before = (project / "metrics/pretrain_history.csv").read_text()
    assert epochs_checkpointed(project / "checkpoints/pretrain") == EPOCHS  # a finished run's checkpoint
    set_params(project / "params.yaml", {"pretrain.learning_rate": 0.002})
    result = run(["dvc", "repro", "pretrain"], project)
    assert "discarding checkpoint in checkpoints/pretrain: params or inputs changed" in result.stdout
    assert "resuming" not in result.stdout
    after = (project / "metrics/pretrain_history.csv").read_text()
    assert history_epochs(project, "pretrain") == list(range(1, EPOCHS + 1)) and after != before


def test_ctrl_c_in_finetune_explains_itself_and_the_rerun_resumes(project):
    run(["dvc", "repro", "pretrain", "baseline"], project)
    checkpoints = project / "checkpoints/finetune"
    job = start([sys.executable, "-m", "stages.finetune"], project)
    wait_until(lambda: epochs_checkpointed(checkpoints) >= 1, job, "a checkpointed epoch")
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    result = finish(job)
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in result.stderr
    assert not (project / "models/finetuned.keras").exists()
    done = epochs_checkpointed(checkpoints)
    assert 1 <= done < EPOCHS

    result = run(["dvc", "repro", "finetune"], project)
    assert f"resuming from checkpoints/finetune after epoch {done}" in result.stdout
    assert history_epochs(project, "finetune") == list(range(1, EPOCHS + 1))
    assert (project / "models/finetuned.keras").is_file()


def stale_records(project: Path) -> list[Path]:
    return list((project / "data").glob(".tfrecords.tmp-*"))


def shards_being_written(project: Path) -> list[Path]:
    return list((project / "data").glob(".tfrecords.tmp-*/*/*.tfrecord"))


def assert_complete_records(project: Path) -> None:
    records = project / "data/tfrecords"
    listed = set()
    for task in ("source", "target"):
        for name in ("train", "val", "test"):
            split = open_split(records, task, name)
            check_shards(split)  # every shard reads, and the counts add up to meta.json's
            listed.update(split.files)
    assert set(records.glob("*/*.tfrecord")) == listed  # no shard beyond those meta.json lists


@pytest.fixture
def slow_preprocess(tmp_path) -> Path:
    """A project whose preprocess writes many shards for a few seconds (160 px JPEG, 2 workers)."""
    archive = write_learnable_archive(tmp_path / "cifar-10-python.tar.gz", train_per_class=60, test_per_class=10)
    project = make_project(tmp_path / "p", archive, {
        "preprocess.image_size": 160, "preprocess.encoding": "jpeg", "preprocess.shard_size_mb": 0.2,
        "preprocess.workers": 2,
    })
    run(["dvc", "repro", "split"], project)
    return project


def test_kill_during_preprocess_leaves_no_stale_shard(slow_preprocess):
    project = slow_preprocess
    job = start([sys.executable, "-m", "stages.preprocess"], project)
    wait_until(lambda: shards_being_written(project), job, "a shard being written")
    workers = psutil.Process(job.pid).children(recursive=True)
    job.kill()  # the stage alone, as the OOM killer would: its workers must not go on writing
    finish(job)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived the stage: {alive}"
    assert stale_records(project) and not (project / "data/tfrecords").exists()

    result = run(["dvc", "repro", "preprocess"], project)
    assert "Running stage 'preprocess'" in result.stdout
    assert not stale_records(project)
    assert_complete_records(project)


def test_ctrl_c_during_preprocess_leaves_nothing(slow_preprocess):
    project = slow_preprocess
    job = start([sys.executable, "-m", "stages.preprocess"], project)
    wait_until(lambda: shards_being_written(project), job, "a shard being written")
    workers = psutil.Process(job.pid).children(recursive=True)
    os.killpg(job.pid, signal.SIGINT)
    result = finish(job)
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in result.stderr
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    assert not stale_records(project) and not (project / "data/tfrecords").exists()
