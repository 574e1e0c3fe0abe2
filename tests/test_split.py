"""Splitting CIFAR-10 into source and target tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import last_line, make_project, run_stage

from transfer.cifar10 import read_archive
from transfer.errors import PipelineError
from transfer.tasks import split_task

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


def per_class(splits: dict) -> dict[str, list[int]]:
    return {split: np.bincount(labels).tolist() for split, (_, labels) in splits.items()}


def test_max_per_class_caps_the_training_pool_and_val_keeps_its_fraction(cifar):
    # The archive has 12 training and 4 test images per class; uncapped, val_fraction 0.25 gives 9/3.
    assert per_class(split_task(cifar, SOURCE, 0.25, None, seed=1)) == {"train": [9] * 5, "val": [3] * 5,
                                                                        "test": [4] * 5}
    capped = split_task(cifar, SOURCE, 0.25, max_per_class=8, seed=1)
    assert per_class(capped) == {"train": [6] * 5, "val": [2] * 5, "test": [4] * 5}
    assert not {img.tobytes() for img in capped["train"][0]} & {img.tobytes() for img in capped["val"][0]}


def test_max_per_class_caps_the_test_split(cifar):
    assert per_class(split_task(cifar, SOURCE, 1 / 3, max_per_class=3, seed=1)) == {
        "train": [2] * 5, "val": [1] * 5, "test": [3] * 5}


def test_a_cap_above_every_class_changes_nothing(cifar):
    full = split_task(cifar, TARGET, 0.25, None, seed=5)
    for cap in (12, 1000):
        capped = split_task(cifar, TARGET, 0.25, cap, seed=5)
        for split in ("train", "val", "test"):
            assert np.array_equal(full[split][0], capped[split][0]) and np.array_equal(full[split][1], capped[split][1])


def test_a_cap_that_leaves_no_training_images_is_refused(cifar):
    with pytest.raises(PipelineError, match=r"^class 'airplane' has no images for the train split "
                                            r"\(data.val_fraction 0.25, data.max_per_class 1\)$"):
        split_task(cifar, SOURCE, 0.25, max_per_class=1, seed=1)


def test_unknown_class_in_archive(cifar):
    renamed = type(cifar)(cifar.train_images, cifar.train_labels, cifar.test_images, cifar.test_labels,
                          ("a",) * 10)
    with pytest.raises(PipelineError, match="class 'dog' is not in the archive"):
        split_task(renamed, TARGET, 0.1, None, seed=1)


def split_twice(project: Path) -> dict[Path, bytes]:
    """The files the split stage writes, after checking that a second run writes the same bytes."""
    run_stage("download", project, check=True)
    files = []
    for _ in range(2):
        run_stage("split", project, check=True)
        files.append({p.relative_to(project): p.read_bytes() for p in (project / "data/split").rglob("*")
                      if p.is_file()})
    assert files[0] == files[1]
    return files[0]


def test_stage_writes_identical_files_twice(tmp_path, tiny_archive):
    assert len(split_twice(make_project(tmp_path / "p", tiny_archive, git=False))) == 13


def test_capped_stage_writes_proportional_identical_files_twice(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"data.max_per_class": 8, "data.val_fraction": 0.25},
                           git=False)
    split_twice(project)
    for task in ("source", "target"):
        counts = {split: np.bincount(np.load(project / f"data/split/{task}/{split}_labels.npy")).tolist()
                  for split in ("train", "val", "test")}
        assert counts == {"train": [6] * 5, "val": [2] * 5, "test": [4] * 5}


def test_stage_refuses_unknown_class_and_leaves_no_output(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"data.target_classes": ["dog", "unicorn"]}, git=False)
    result = run_stage("split", project)
    assert result.returncode == 1 and "data.target_classes[1]: got 'unicorn'" in last_line(result)
    assert not (project / "data/split").exists()
