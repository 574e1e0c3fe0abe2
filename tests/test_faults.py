"""Interrupted stages, with real processes: kill -9 and Ctrl-C, then rerun.

A killed run must leave nothing that looks finished, and the rerun must
continue from the last finished epoch (training) or start clean (preprocess).
A resumed run is the same run: it ends with the metrics and weights of an
uninterrupted one. A checkpoint is resumed only while everything dvc.yaml
lists for its stage is unchanged, and a finished stage leaves none.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import (
    assert_same_weights,
    copy_project,
    epochs_checkpointed,
    finish,
    make_project,
    metrics_without_timing,
    run,
    set_params,
    sources,
    start,
    wait_until,
    weights,
    write_learnable_archive,
)

from benchmarks import kill_sweep, timed_repro
from transfer.outputs import recover
from transfer.records import check_shards, open_split

EPOCHS = 5
INTERRUPTED = "error: interrupted; nothing was recorded as done, rerun `dvc repro`"


def history_epochs(project: Path, stage: str) -> list[int]:
    rows = (project / f"metrics/{stage}_history.csv").read_text().splitlines()[1:]
    return [int(float(row.split(",")[0])) for row in rows]


def assert_same_run(project: Path, twin: Path, stage: str, model: str) -> None:
    """The interrupted-and-resumed run and the uninterrupted one agree to the last bit, and kept the same epoch
    (training.keep=best: the best weights so far are part of the checkpoint)."""
    assert metrics_without_timing(project, stage) == metrics_without_timing(twin, stage)
    assert metrics_without_timing(project, stage)["keep"] == "best"
    assert_same_weights(weights(project / model), weights(twin / model))


def kill_after_an_epoch(project: Path, stage: str, sent: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    """Start the stage, interrupt it once it checkpointed an epoch, and return what it printed."""
    job = start([sys.executable, "-m", f"stages.{stage}"], project)
    wait_until(lambda: epochs_checkpointed(project / "checkpoints" / stage) >= 1, job, "a checkpointed epoch")
    os.killpg(job.pid, sent)
    result = finish(job)
    # A stop between the two renames that make a new checkpoint current leaves the old one aside: the next start
    # puts it back (or moves the new one in) before it reads anything, as checkpoints.resume does; so here.
    recover(project / "checkpoints" / stage / "latest")
    done = epochs_checkpointed(project / "checkpoints" / stage)
    assert 1 <= done < EPOCHS, (done, result.returncode, result.stderr[-2000:])
    return result


SETTINGS = {"pretrain.epochs": EPOCHS, "finetune.epochs": EPOCHS, "finetune.cache_features": False, "strategy": 2,
            "training.deterministic": True}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Enough images that an epoch takes a moment."""
    folder = tmp_path_factory.mktemp("archive")
    return write_learnable_archive(folder / "cifar-10-python.tar.gz", train_per_class=60, test_per_class=10)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, archive) -> Path:
    """TFRecords ready; finetune trains strategy 2 through the base, so it checkpoints every epoch."""
    project = make_project(tmp_path_factory.mktemp("faults") / "preprocessed", archive, SETTINGS)
    run(["dvc", "repro", "preprocess"], project)
    return project


@pytest.fixture(scope="module")
def project(preprocessed, tmp_path_factory) -> Path:
    """The project the tests interrupt, one after the other."""
    return copy_project(preprocessed, tmp_path_factory.mktemp("faults") / "p")


@pytest.fixture(scope="module")
def twin(preprocessed, tmp_path_factory) -> Path:
    """The same params and data, run without interruption."""
    twin = copy_project(preprocessed, tmp_path_factory.mktemp("twin") / "p")
    run(["dvc", "repro", "finetune"], twin)
    return twin


def test_pretrain_killed_mid_epoch_resumes_as_the_same_run(project, twin):
    kill_after_an_epoch(project, "pretrain")
    done = epochs_checkpointed(project / "checkpoints/pretrain")
    assert not (project / "models/pretrained.keras").exists()

    result = run(["dvc", "repro", "pretrain"], project)
    assert f"resuming from checkpoints/pretrain after epoch {done}" in result.stdout
    assert history_epochs(project, "pretrain") == list(range(1, EPOCHS + 1))
    assert json.loads((project / "metrics/pretrain.json").read_text())["epochs"] == EPOCHS
    assert "modified" not in run(["dvc", "status", "pretrain"], project).stdout
    assert not (project / "checkpoints/pretrain").exists()  # finished: nothing left to resume
    assert_same_run(project, twin, "pretrain", "models/pretrained.keras")


def test_ctrl_c_in_finetune_explains_itself_and_resumes_as_the_same_run(project, twin):
    run(["dvc", "repro", "baseline"], project)
    assert not (project / "checkpoints/baseline").exists()
    result = kill_after_an_epoch(project, "finetune", signal.SIGINT)  # what Ctrl-C in a terminal sends
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in result.stderr
    assert not (project / "models/finetuned.keras").exists()
    done = epochs_checkpointed(project / "checkpoints/finetune")

    result = run(["dvc", "repro", "finetune"], project)
    assert f"resuming from checkpoints/finetune after epoch {done}" in result.stdout
    assert history_epochs(project, "finetune") == list(range(1, EPOCHS + 1))
    assert not (project / "checkpoints/finetune").exists()
    assert_same_run(project, twin, "finetune", "models/finetuned.keras")


def test_changed_code_discards_the_checkpoint_and_trains_the_new_network(project):
    kill_after_an_epoch(project, "pretrain")
    models = project / "transfer/models.py"
    models.write_text(models.read_text().replace("for filters in (32, 64, 128):", "for filters in (16, 64, 128):"))
    result = run(["dvc", "repro", "pretrain"], project)
    assert "discarding checkpoint in checkpoints/pretrain: transfer/models.py changed" in result.stdout
    assert "resuming" not in result.stdout
    assert history_epochs(project, "pretrain") == list(range(1, EPOCHS + 1))
    import keras

    first_convolution = keras.models.load_model(project / "models/pretrained.keras").get_layer("small_cnn").layers[1]
    assert first_convolution.filters == 16


def test_changed_seed_discards_the_baseline_checkpoint(project):
    kill_after_an_epoch(project, "baseline")
    set_params(project / "params.yaml", {"seed": 7})  # a new split, so new TFRecords with the same counts
    result = run(["dvc", "repro", "baseline"], project)
    assert "discarding checkpoint in checkpoints/baseline: data/tfrecords changed" in result.stdout
    assert "resuming" not in result.stdout
    assert history_epochs(project, "baseline") == list(range(1, EPOCHS + 1))


def test_changed_data_with_the_same_counts_discards_the_finetune_checkpoint(project, tmp_path):
    kill_after_an_epoch(project, "finetune")
    other = write_learnable_archive(tmp_path / "other.tar.gz", train_per_class=60, test_per_class=10, noise_seed=5)
    set_params(project / "params.yaml", {"data.sources": sources(other)})
    result = run(["dvc", "repro", "finetune"], project)
    assert "discarding checkpoint in checkpoints/finetune: data/tfrecords, metrics/baseline.json" in result.stdout
    assert "resuming" not in result.stdout
    assert history_epochs(project, "finetune") == list(range(1, EPOCHS + 1))
    assert not list((project / "checkpoints").iterdir())


def test_a_damaged_pretrained_model_is_one_line_naming_it(project):
    model = project / "models/pretrained.keras"
    model.write_bytes(b"not a zip file at all")
    result = run([sys.executable, "-m", "stages.finetune"], project, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: models/pretrained.keras is not a readable Keras model (")
    assert result.stderr.strip().splitlines()[-1].endswith("); rerun the pretrain stage")


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


@pytest.fixture(scope="module")
def split_for_slow_preprocess(tmp_path_factory, archive) -> Path:
    """A split project whose preprocess writes many shards for a few seconds (160 px JPEG, 2 workers)."""
    project = make_project(tmp_path_factory.mktemp("slow") / "p", archive, {
        "preprocess.image_size": 160, "preprocess.encoding": "jpeg", "preprocess.shard_size_mb": 0.2,
        "preprocess.workers": 2,
    })
    run(["dvc", "repro", "split"], project)
    return project


@pytest.fixture
def slow_preprocess(split_for_slow_preprocess, tmp_path) -> Path:
    return copy_project(split_for_slow_preprocess, tmp_path / "p")


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


def test_kill_9_of_dvc_repro_at_any_instant_ends_as_the_uninterrupted_run(tmp_path):
    """benchmarks/kill_sweep.py's kill test (its sweep: 20 or more kills at random instants) with 3 kills of the
    whole pipeline's process group, aimed where stages are at work: half way through preprocess (writing shards),
    late in pretrain and in finetune (a rerun faster than the reference is killed at the next stage's start).
    Rerun after each, it ends as an uninterrupted run, with nothing left behind and no traceback."""
    archive = write_learnable_archive(tmp_path / "cifar-10-python.tar.gz")
    reference, killed = (make_project(tmp_path / name, archive, {"strategy": 2}) for name in ("reference", "killed"))
    places = {"preprocess": 0.5, "pretrain": 0.9, "finetune": 0.8}
    _, kills, _, found = kill_sweep.kill_test(reference, killed, lambda timeline: timed_repro.instants_in(
        timeline, places), tmp_path / "logs", timeout=1200)
    assert len(kills) == len(places) and found == [], "\n".join(map(str, [*found, *kills]))
