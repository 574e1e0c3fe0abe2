"""Training speed of the CPU profile's small CNN in CPU seconds: batch sizes, and XLA (training.jit_compile).

    python -m benchmarks.fit_speed [--images 11264] [--epochs 2] [--settings 32,32xla,128]

Each setting trains the same network (the small CNN at 32x32, 5 classes, RMSprop 5e-4, steps_per_execution 15)
on the same in-memory random images, in a fresh process of its own (op determinism cannot be switched off
again, and XLA needs it off), after a warm-up epoch. It reports images per CPU second (user+sys of the
process: what a shared machine inflates least) and per wall second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks.common import arguments, report


def measure(batch: int, xla: bool, images: int, epochs: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from transfer.models import build_base, classifier

    if not xla:  # as the pipeline runs (training.deterministic: true); Keras drops XLA under op determinism
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (images, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, images)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(2)
    model = classifier(build_base("small_cnn", 32, "none"), "small_cnn", 5, 128, 0.5, base_training=None)
    model.compile(optimizer=keras.optimizers.RMSprop(5e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=15, jit_compile=xla)
    model.fit(data, epochs=1, verbose=0)  # tracing and compiling outside the clock
    cpu, wall = time.process_time(), time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"batch": batch, "xla": xla, "images_per_cpu_second": round(images * epochs / cpu, 1),
            "images_per_wall_second": round(images * epochs / wall, 1)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--images", type=int, default=11264)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--settings", default="32,32xla,128", help="batch sizes, 'xla' after one turns XLA on")
    parser.add_argument("--one", help="internal: measure one setting in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one.removesuffix("xla")), args.one.endswith("xla"), args.images,
                                 args.epochs)))
        return
    results = []
    for setting in args.settings.split(","):
        done = subprocess.run([sys.executable, "-m", "benchmarks.fit_speed", "--one", setting, "--images",
                               str(args.images), "--epochs", str(args.epochs)], capture_output=True, text=True,
                              check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report({"benchmark": "fit_speed", "images": args.images, "epochs": args.epochs, "settings": results})


if __name__ == "__main__":
    main()
