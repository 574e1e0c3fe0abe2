"""What the benchmarks build before they time anything."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers import md5_of

from benchmarks import serving
from benchmarks.common import archive_share, arguments, run_stages, workspace
from transfer.cifar10 import read_archive
from transfer.paths import RECORDS, SPLITS, TASKS
from transfer.records import open_split


def test_archive_share_keeps_every_class_in_proportion(tiny_archive, tmp_path):
    full = read_archive(tiny_archive)  # 12 training and 4 test images per class
    path, md5 = archive_share(tiny_archive, 0.5, tmp_path)
    share = read_archive(path)
    assert md5 == md5_of(path)
    assert share.class_names == full.class_names
    for labels in (share.train_labels, share.test_labels):
        counts = np.bincount(labels, minlength=len(full.class_names))
        assert len(set(counts)) == 1
    assert len(share.train_labels) == len(full.train_labels) // 2
    assert len(share.test_labels) == len(full.test_labels) // 2
    # The first images of each class, unchanged.
    first_dog = np.flatnonzero(full.train_labels == 5)[0]
    np.testing.assert_array_equal(share.train_images[np.flatnonzero(share.train_labels == 5)[0]],
                                  full.train_images[first_dog])


@pytest.fixture
def tiny_workspace(tiny_archive, tmp_path, monkeypatch):
    """A benchmark workspace on the tiny archive; the working directory comes back after the test."""
    monkeypatch.chdir(tmp_path)
    args = arguments("test").parse_args(["--archive", str(tiny_archive), "--md5", md5_of(tiny_archive),
                                         "--workdir", str(tmp_path)])
    return workspace("w", args, {"model.backbone": "small_cnn", "model.weights": "none",
                                 "preprocess.image_size": 32, "preprocess.encoding": "raw"})


def test_run_stages_builds_the_records_in_the_workspace(tiny_workspace):
    run_stages("download", "split", "preprocess")
    for task in TASKS:  # 5 classes of 12 training and 4 test images each
        counts = {split: open_split(tiny_workspace / RECORDS, task, split).count for split in SPLITS}
        assert counts["train"] + counts["val"] == 60 and counts["test"] == 20, (task, counts)


def test_a_failed_stage_ends_the_benchmark_with_its_stderr(tiny_workspace):
    with pytest.raises(SystemExit) as raised:
        run_stages("split")  # before download: no archive to split
    message = str(raised.value.code)
    assert message.startswith("benchmark: `python -m stages.split` failed (exit code 1):\n")
    assert message.splitlines()[-1].startswith("error: ")  # the stage's own one-line error


def test_the_serving_benchmark_times_both_sides_on_the_same_images(tiny_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["serving", "--archive", str(tiny_archive), "--workdir", str(tmp_path),
                                      "--backbone", "small_cnn", "--image-size", "32", "--batch", "8",
                                      "--calls", "3", "--repeats", "1"])
    serving.main()
    result = json.loads(capsys.readouterr().out.split("RESULT ")[-1])
    assert result["batch"] == 8 and result["top1_agreement"] == 1.0  # the same network on the same images
    for side in ("keras_predict", "saved_model", "saved_model_png", "keras_call"):
        assert 0 < result[f"{side}_batch1"]["p50_ms"] <= result[f"{side}_batch1"]["p99_ms"], side
    assert result["throughput_ratio"] == pytest.approx(
        result["saved_model_images_per_second"] / result["keras_predict_images_per_second"], rel=0.01)
    assert (tmp_path / "serving/model.tflite").is_file()
