"""What the benchmarks build before they time anything."""

from __future__ import annotations

import numpy as np
from helpers import md5_of

from benchmarks.common import archive_share
from transfer.cifar10 import read_archive


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
