"""The records' public functions called in the test's own process on a few images (test_records.py checks the
preprocess stage's shards, written in a subprocess that mutation testing cannot see)."""

from __future__ import annotations

import numpy as np

from transfer import records


def test_shard_names_sort_in_order_and_say_how_many():
    assert records.shard_name("train", 3, 12) == "train-00003-of-00012.tfrecord"


def test_raw_encoding_round_trips_bit_for_bit():
    image = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    encoded = records.encode(image, "raw", 95)
    assert encoded == image.tobytes()
    np.testing.assert_array_equal(records.decode(encoded, "raw", 5).numpy(), image)
