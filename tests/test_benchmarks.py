"""What the benchmarks build before they time anything."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import md5_of

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
