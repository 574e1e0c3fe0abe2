"""Input pipeline: training images/s fed from the TFRecords against in-memory synthetic tensors.

Same model, same batch size, same compiled step; only the input differs. A
ratio near 1 means the tf.data pipeline keeps up with training.

    python -m benchmarks.input_pipeline [--backbone small_cnn --image-size 32 --encoding raw]
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf

from benchmarks.common import arguments, report, run_stages, workspace
from transfer.config import load_params
from transfer.fitting import compile_model
from transfer.models import build_base, classifier
from transfer.paths import RECORDS
from transfer.records import dataset, open_split
from transfer.runtime import set_up


def images_per_second(model: keras.Model, data: tf.data.Dataset, images: int, epochs: int) -> float:
    model.fit(data, epochs=1, verbose=0, shuffle=False)  # compile and warm up outside the clock
    started = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0, shuffle=False)
    return images * epochs / (time.perf_counter() - started)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "inception_v3"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--encoding", default="raw", choices=["jpeg", "raw"])
    parser.add_argument("--per-class", type=int, default=None, help="cap per class and split (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    workspace("input_pipeline", args, {
        "model.backbone": args.backbone, "model.weights": "none", "preprocess.image_size": args.image_size,
        "preprocess.encoding": args.encoding, "data.max_per_class": args.per_class,
    })
    run_stages("download", "split", "preprocess")
    params = load_params()
    runtime = set_up(params.training, params.seed)
    train = open_split(RECORDS, "source", "train")
    batch = params.pretrain.batch_size
    records = dataset(train, batch, shuffle_buffer=params.training.shuffle_buffer, seed=params.seed)
    steps = -(-train.count // batch)
    images, labels = next(iter(records))
    synthetic = tf.data.Dataset.from_tensors((images, labels)).repeat(steps)

    rates = {}
    for name, data in (("synthetic", synthetic), ("tfrecords", records)):
        keras.utils.set_random_seed(params.seed)
        model = classifier(build_base(args.backbone, args.image_size, "none"), args.backbone, len(train.classes),
                           params.model.head_units, params.model.dropout, base_training=None)
        compile_model(model, params.pretrain.learning_rate, params.training, runtime)
        rates[name] = images_per_second(model, data, steps * batch, args.epochs)
    report({"benchmark": "input_pipeline", "backbone": args.backbone, "image_size": args.image_size,
            "encoding": args.encoding, "batch_size": batch, "images_per_epoch": steps * batch,
            "images_per_second_tfrecords": round(rates["tfrecords"], 1),
            "images_per_second_synthetic": round(rates["synthetic"], 1),
            "ratio": round(rates["tfrecords"] / rates["synthetic"], 3)})


if __name__ == "__main__":
    main()
