"""Mixed precision on the CPU: images/s in float32, bfloat16 (`training.mixed_precision: true` on a CPU) and float16.

The same classifier (InceptionV3, random weights) on in-memory synthetic images:
inference at the feature-cache batch size, and training of the whole network.
Only the compute dtype differs; the output layer stays float32.

    python -m benchmarks.mixed_precision [--image-size 75 --batches 8]
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks.common import arguments, report
from transfer.evaluation import EVAL_BATCH
from transfer.models import build_base, classifier


def rates(image_size: int, batches: int, train: bool = True) -> tuple[float, float | None]:
    """(inference, training) images/s under the current global dtype policy."""
    keras.utils.set_random_seed(0)
    model = classifier(build_base("inception_v3", image_size, "none"), "inception_v3", 5, 128, 0.5,
                       base_training=None)
    images = tf.random.uniform((EVAL_BATCH, image_size, image_size, 3), 0, 255)
    step = tf.function(lambda x: model(x, training=False))
    step(images).numpy()  # trace and warm up outside the clock
    started = time.perf_counter()
    for _ in range(batches):
        step(images).numpy()
    inference = batches * EVAL_BATCH / (time.perf_counter() - started)
    if not train:
        return inference, None

    model.compile(keras.optimizers.RMSprop(1e-3), keras.losses.SparseCategoricalCrossentropy(),
                  steps_per_execution=10)
    x = np.asarray(images)[np.arange(32 * 10 * batches) % EVAL_BATCH]
    y = np.arange(len(x)) % 5
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return inference, len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--batches", type=int, default=8, help="inference batches of 256 (training: 10x as many of 32)")
    args = parser.parse_args()
    measured = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        measured[policy] = rates(args.image_size, args.batches)
    # float16 training on a CPU is too slow to wait for; its inference says enough.
    keras.mixed_precision.set_global_policy("mixed_float16")
    measured["mixed_float16"] = (rates(args.image_size, args.batches, train=False)[0], None)
    result = {"benchmark": "mixed_precision", "backbone": "inception_v3", "image_size": args.image_size}
    for policy, (inference, training) in measured.items():
        result[f"{policy}_inference_images_per_second"] = round(inference, 1)
        result[f"{policy}_inference_speedup"] = round(inference / measured["float32"][0], 2)
        if training is not None:
            result[f"{policy}_training_images_per_second"] = round(training, 1)
            result[f"{policy}_training_speedup"] = round(training / measured["float32"][1], 2)
    report(result)


if __name__ == "__main__":
    main()
