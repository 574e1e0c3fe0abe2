"""Splitting CIFAR-10 into source and target tasks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import last_line, make_project, run_stage

from stages.split import split_task
from transfer.cifar10 import read_archive
from transfer.errors import PipelineError

SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET = ["dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar(tiny_archive):
    return read_archive(tiny_archive)


def test_archive_reads_in_official_layout(cifar):
    assert cifar.train_images.shape == (120, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (40, 32, 32, 3)
    assert cifar.class_names[5] == "dog"


def test_labels_are_remapped_in_listed_order(cifar):
    splits = split_task(cifar, TARGET, val_fraction=0.25, max_per_class=None, seed=3)
    images, labels = splits["test"]
    assert sorted(np.unique(labels)) == [0, 1, 2, 3, 4]
    # every test image of new label 2 is a "horse" image (original label 7) of the archive
    horses = {img.tobytes() for img in cifar.test_images[cifar.test_labels == 7]}
    assert {img.tobytes() for img in images[labels == 2]} == horses


def test_val_is_stratified_and_disjoint_from_train(cifar):
    splits = split_task(cifar, SOURCE, val_fraction=0.25, max_per_class=None, seed=3)
    assert np.bincount(splits["val"][1]).tolist() == [3] * 5
    assert np.bincount(splits["train"][1]).tolist() == [9] * 5
    train = {img.tobytes() for img in splits["train"][0]}
    assert not train & {img.tobytes() for img in splits["val"][0]}


def test_split_is_deterministic_per_seed(cifar):
    first = split_task(cifar, SOURCE, 0.25, None, seed=7)
    again = split_task(cifar, SOURCE, 0.25, None, seed=7)
    other = split_task(cifar, SOURCE, 0.25, None, seed=8)
    for split in ("train", "val", "test"):
        assert np.array_equal(first[split][0], again[split][0]) and np.array_equal(first[split][1], again[split][1])
    assert not np.array_equal(first["train"][0], other["train"][0])


def test_max_per_class_caps_every_split(cifar):
    splits = split_task(cifar, SOURCE, 0.25, max_per_class=2, seed=1)
    for _, labels in splits.values():
        assert np.bincount(labels).tolist() == [2] * 5


def test_unknown_class_in_archive(cifar):
    renamed = type(cifar)(cifar.train_images, cifar.train_labels, cifar.test_images, cifar.test_labels,
                          ("a",) * 10)
    with pytest.raises(PipelineError, match="class 'dog' is not in the archive"):
        split_task(renamed, TARGET, 0.1, None, seed=1)


def test_stage_writes_identical_files_twice(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, git=False)
    run_stage("download", project, check=True)
    run_stage("split", project, check=True)
    first = {p.relative_to(project): p.read_bytes() for p in (project / "data/split").rglob("*") if p.is_file()}
    run_stage("split", project, check=True)
    again = {p.relative_to(project): p.read_bytes() for p in (project / "data/split").rglob("*") if p.is_file()}
    assert first == again and len(first) == 13


def test_stage_refuses_unknown_class_and_leaves_no_output(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"data.target_classes": ["dog", "unicorn"]}, git=False)
    result = run_stage("split", project)
    assert result.returncode == 1 and "data.target_classes.1: got 'unicorn'" in last_line(result)
    assert not (project / "data/split").exists()
