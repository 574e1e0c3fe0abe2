"""Stage 2: split CIFAR-10 into a source task and a target task (transfer/tasks.py).

Writes data/split/<task>/<split>_{images,labels}.npy and classes.json; the same seed gives byte-identical files.
"""

from __future__ import annotations

import json

import numpy as np

from transfer.cifar10 import read_archive
from transfer.config import load_params
from transfer.errors import run_stage
from transfer.outputs import atomic_output
from transfer.paths import ARCHIVE, SPLIT
from transfer.tasks import split_task


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
