"""The source and target tasks: which CIFAR-10 images each task's train, val and test splits hold.

Each task relabels its classes 0..n-1 in the order params.yaml lists them and
gets train/val/test splits: val is carved from the official training images,
stratified per class; the official test images stay the test set. The same
seed gives the same arrays.

data.max_per_class M caps how many images of a class are drawn from each
official set, so a quick run keeps a full run's proportions: M of its
training images (picked by the seed), from which val is carved at
data.val_fraction exactly as from all of them, and the first M of its test
images. With val_fraction 0.1 and M 1000 a class has train 900, val 100,
test 1000 (a full run: 4500, 500, 1000); an M at or above a class's count
changes nothing.
"""

from __future__ import annotations

import numpy as np

from transfer.cifar10 import Cifar10
from transfer.errors import PipelineError
from transfer.paths import SPLITS


def split_task(
    cifar: Cifar10, classes: list[str], val_fraction: float, max_per_class: int | None, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, labels)} for one task, labels 0..len(classes)-1, capped as the module says."""
    unknown = [name for name in classes if name not in cifar.class_names]
    if unknown:
        raise PipelineError(f"class {unknown[0]!r} is not in the archive ({', '.join(cifar.class_names)})")
    rng = np.random.default_rng(seed)
    picked: dict[str, list[tuple[np.ndarray, int]]] = {split: [] for split in SPLITS}
    for new_label, name in enumerate(classes):
        original = cifar.class_names.index(name)
        # Capped before val is carved, so val keeps its fraction of what a capped run trains on.
        train_pool = rng.permutation(np.flatnonzero(cifar.train_labels == original))[:max_per_class]
        n_val = max(1, round(len(train_pool) * val_fraction))
        chosen = {
            "val": train_pool[:n_val],
            "train": train_pool[n_val:],
            "test": np.flatnonzero(cifar.test_labels == original)[:max_per_class],
        }
        for split, indices in chosen.items():
            if len(indices) == 0:
                raise PipelineError(f"class {name!r} has no images for the {split} split "
                                    f"(data.val_fraction {val_fraction}, data.max_per_class {max_per_class})")
            picked[split].append((indices, new_label))
    result = {}
    for split in SPLITS:
        images = cifar.test_images if split == "test" else cifar.train_images
        indices = np.concatenate([indices for indices, _ in picked[split]])
        labels = np.concatenate([np.full(len(indices), label) for indices, label in picked[split]])
        order = rng.permutation(len(indices))  # mix the classes within every split
        result[split] = (images[indices[order]], labels[order].astype(np.int64))
    return result
