"""Stage 2: split CIFAR-10 into a source task and a target task.

Each task relabels its classes 0..n-1 in the order params.yaml lists them and
gets train/val/test splits: val is carved from the official training images,
stratified per class; the official test images stay the test set. The same
seed gives byte-identical files.

data.max_per_class M caps how many images of a class are drawn from each
official set, so a quick run keeps a full run's proportions: M of its
training images (picked by the seed), from which val is carved at
data.val_fraction exactly as from all of them, and the first M of its test
images. With val_fraction 0.1 and M 1000 a class has train 900, val 100,
test 1000 (a full run: 4500, 500, 1000); an M at or above a class's count
changes nothing.
"""

from __future__ import annotations

import json

import numpy as np

from transfer.cifar10 import Cifar10, read_archive
from transfer.config import load_params
from transfer.errors import PipelineError, run_stage
from transfer.outputs import atomic_output
from transfer.paths import ARCHIVE, SPLIT

TASKS = ("source", "target")
SPLITS = ("train", "val", "test")


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


def main() -> None:
    params = load_params()
    cifar = read_archive(ARCHIVE)
    tasks = {"source": params.data.source_classes, "target": params.data.target_classes}
    splits = {
        task: split_task(cifar, classes, params.data.val_fraction, params.data.max_per_class, params.seed)
        for task, classes in tasks.items()
    }
    with atomic_output(SPLIT) as folder:
        for task, per_split in splits.items():
            (folder / task).mkdir(parents=True)
            for split, (images, labels) in per_split.items():
                np.save(folder / task / f"{split}_images.npy", images)
                np.save(folder / task / f"{split}_labels.npy", labels)
        (folder / "classes.json").write_text(json.dumps(tasks, indent=2) + "\n")
    for task, per_split in splits.items():
        counts = ", ".join(f"{split} {len(labels)}" for split, (_, labels) in per_split.items())
        print(f"split: {task} ({', '.join(tasks[task])}): {counts}")


if __name__ == "__main__":
    run_stage(main)
