"""The exported SavedModel against keras.Model.predict and a compiled tf.function: batch-1 latency, throughput.

    python -m benchmarks.serving [--backbone inception_v3 --image-size 75 --batch 256 --calls 100 --repeats 5]

Both sides get the same prepared float images (the target test images of the CIFAR-10 archive, given as PNG
files and prepared by images.prepare as `cifar10-transfer predict` does): Keras through
`model.predict(images, batch_size=...)`, the export through its `pixels` signature, so both time the network
alone. predict() sets up a data pipeline on every call, so it is no fair baseline at batch 1: the same Keras
model called inside a compiled `tf.function` (graph mode, no XLA, as the export; `keras_function_*`) is, and
`function_latency_ratio_*` and `function_throughput_ratio` compare the export with it: what serving gains over
the best one can do with the Keras model in the same process. The export's `serving_default`, which decodes
and prepares the PNG bytes itself, and a plain eager call of the Keras model (`model(images)`) are timed as
well, for information.
The classifier is built with random weights (no ImageNet download here; weights do not change the time) and
exported by transfer/serving.py as the export stage does. Every ratio is the Keras side's time over the
export's: above 1 when the export is faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from benchmarks.common import ROOT, arguments, report
from transfer.cifar10 import read_archive
from transfer.config import load_params
from transfer.images import Storage, prepare
from transfer.models import Description, build_base, classifier
from transfer.serving import PIXELS_SIGNATURE, SAVED_MODEL, SERVING_SIGNATURE, export


def target_pngs(archive: Path, classes: tuple[str, ...], count: int) -> list[bytes]:
    """The first `count` test images of `classes` as PNG files."""
    cifar = read_archive(archive)
    wanted = [cifar.class_names.index(name) for name in classes]
    picked = np.flatnonzero(np.isin(cifar.test_labels, wanted))[:count]
    return [tf.io.encode_png(image).numpy() for image in cifar.test_images[picked]]


def latencies_ms(call: Callable[[], object], calls: int) -> np.ndarray:
    call()  # traced and warmed before timing
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return np.array(times)


def images_per_second(call: Callable[[], object], images: int, repeats: int) -> float:
    call()
    best = min(_seconds(call) for _ in range(repeats))  # the least disturbed run of a shared machine
    return images / best


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--backbone", default="inception_v3", choices=["small_cnn", "inception_v3"])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--batch", type=int, default=256, help="images per call for the throughput")
    parser.add_argument("--calls", type=int, default=100, help="batch-1 calls timed for the latency percentiles")
    parser.add_argument("--repeats", type=int, default=5, help="timed large-batch calls (the fastest counts)")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")  # the reference head, classes and image encoding
    classes = tuple(params.data.target_classes)
    files = target_pngs(args.archive, classes, args.batch)
    storage = Storage(args.image_size, params.preprocess.encoding, params.preprocess.jpeg_quality)
    model = classifier(build_base(args.backbone, args.image_size, "none"), args.backbone, len(classes),
                       params.model.head_units, params.model.dropout, base_training=False)
    folder = args.workdir / "serving"
    folder.mkdir(parents=True, exist_ok=True)
    export(model, Description(classes, storage), folder)
    loaded = tf.saved_model.load(str(folder / SAVED_MODEL))
    pixels_signature, files_signature = loaded.signatures[PIXELS_SIGNATURE], loaded.signatures[SERVING_SIGNATURE]

    images = np.stack([prepare(tf.constant(data), storage).numpy() for data in files])
    one, one_file = images[:1], tf.constant(files[:1])
    batch, batch_files = tf.constant(images), tf.constant(files)
    keras_ms = latencies_ms(lambda: model.predict(one, batch_size=1, verbose=0), args.calls)
    called_ms = latencies_ms(lambda: model(one, training=False), args.calls)  # no predict(): for information
    compiled = tf.function(lambda pixels: model(pixels, training=False))  # traces once per batch shape
    function_ms = latencies_ms(lambda: compiled(tf.constant(one)), args.calls)
    saved_ms = latencies_ms(lambda: pixels_signature(pixels=tf.constant(one)), args.calls)
    files_ms = latencies_ms(lambda: files_signature(images=one_file), args.calls)
    keras_rate = images_per_second(lambda: model.predict(images, batch_size=len(images), verbose=0), len(images),
                                   args.repeats)
    function_rate = images_per_second(lambda: compiled(batch), len(images), args.repeats)
    saved_rate = images_per_second(lambda: pixels_signature(pixels=batch), len(images), args.repeats)
    files_rate = images_per_second(lambda: files_signature(images=batch_files), len(images), args.repeats)
    exported = np.argmax(pixels_signature(pixels=batch)["probabilities"].numpy(), axis=1)
    agree = np.mean(np.argmax(model.predict(images, batch_size=len(images), verbose=0), axis=1) == exported)
    function_agree = np.mean(np.argmax(compiled(batch).numpy(), axis=1) == exported)

    def percentiles(times: np.ndarray) -> dict:
        return {f"p{q}_ms": round(float(np.percentile(times, q)), 2) for q in (50, 99)}

    def ratio(keras_side: np.ndarray, q: int) -> float:
        return round(float(np.percentile(keras_side, q) / np.percentile(saved_ms, q)), 2)

    report({
        "benchmark": "serving", "backbone": args.backbone, "image_size": args.image_size, "batch": len(images),
        "calls": args.calls, "keras_version": keras.__version__, "tensorflow_version": tf.__version__,
        "keras_predict_batch1": percentiles(keras_ms), "saved_model_batch1": percentiles(saved_ms),
        "saved_model_png_batch1": percentiles(files_ms), "keras_call_batch1": percentiles(called_ms),
        "keras_function_batch1": percentiles(function_ms),
        "keras_predict_images_per_second": round(keras_rate, 1),
        "keras_function_images_per_second": round(function_rate, 1),
        "saved_model_images_per_second": round(saved_rate, 1),
        "saved_model_png_images_per_second": round(files_rate, 1),
        "latency_ratio_p50": ratio(keras_ms, 50), "latency_ratio_p99": ratio(keras_ms, 99),
        "throughput_ratio": round(saved_rate / keras_rate, 2),
        "function_latency_ratio_p50": ratio(function_ms, 50), "function_latency_ratio_p99": ratio(function_ms, 99),
        "function_throughput_ratio": round(saved_rate / function_rate, 2),
        "top1_agreement": round(float(agree), 4), "function_top1_agreement": round(float(function_agree), 4),
    })


if __name__ == "__main__":
    main()
