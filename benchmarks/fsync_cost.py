"""What flushing a checkpoint to disk costs: checkpoints.save with fsync (as the pipeline does) vs without.

A training stage saves model (weights and optimizer state), state.json and the best epoch's weights after
every epoch (transfer/checkpoints.py), through outputs.atomic_output, which fsyncs every file and folder
before the swap. This times that save on this disk for the small CNN at 32 px and for InceptionV3 at 299 px
(the reference run, every layer trainable: the largest checkpoint), alternating saves with and without the
fsync calls, and reports the median of each and their ratio.

    python -m benchmarks.fsync_cost [--repeats 5] [--workdir /tmp/benchmarks]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import keras

from benchmarks.common import arguments, report
from transfer import outputs
from transfer.checkpoints import Checkpoints, Progress, save
from transfer.models import build_base, classifier

MODELS = {"small_cnn_32px": ("small_cnn", 32), "inception_v3_299px": ("inception_v3", 299)}


def checkpointed_model(backbone: str, image_size: int) -> keras.Model:
    """A classifier as a training stage checkpoints it: every layer trainable, RMSprop's state built."""
    keras.utils.set_random_seed(0)
    model = classifier(build_base(backbone, image_size, "none"), backbone, 5, 128, 0.5, base_training=None)
    model.compile(keras.optimizers.RMSprop(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    return model


def timed_save(checkpoints: Checkpoints, model: keras.Model, progress: Progress, fsync: bool) -> float:
    flushes = outputs.fsync_tree, outputs._fsync_parent
    if not fsync:
        outputs.fsync_tree = outputs._fsync_parent = lambda path: None
    try:
        started = time.perf_counter()
        save(checkpoints, model, progress, model.get_weights())
        return time.perf_counter() - started
    finally:
        outputs.fsync_tree, outputs._fsync_parent = flushes


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="saves timed per model and setting")
    args = parser.parse_args()
    result = {"benchmark": "fsync_cost", "repeats": args.repeats}
    for name, (backbone, image_size) in MODELS.items():
        model = checkpointed_model(backbone, image_size)
        checkpoints = Checkpoints(args.workdir / "fsync_cost" / name, {"cmd": "", "deps": {}, "params": {}}, 32)
        progress = Progress(history=[{"epoch": 1, "val_accuracy": 0.5}])
        timed_save(checkpoints, model, progress, fsync=True)  # warm-up: the first save also traces the model
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for fsync in (True, False):
                times[fsync].append(timed_save(checkpoints, model, progress, fsync))
        with_fsync, without = statistics.median(times[True]), statistics.median(times[False])
        result[name] = {"checkpoint_mib": round(folder_mib(checkpoints.latest), 1),
                        "with_fsync_seconds": round(with_fsync, 3), "without_fsync_seconds": round(without, 3),
                        "ratio": round(with_fsync / without, 2)}
        outputs.remove(checkpoints.folder)
    report(result)


if __name__ == "__main__":
    main()
