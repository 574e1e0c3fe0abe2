"""The feature cache's files: rows of bytes, one per image (an int32 label, then each output of the frozen prefix
flattened in the storage dtype), in shards of a fixed number of rows. transfer/feature_cache.py writes them
through `ShardWriter` and reads them back with tf.data's FixedLengthRecordDataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_DTYPE = np.dtype("<i4")
UNDERFLOW_SHARE = 0.01  # a batch with more features than this rounding to 0 (below about 6e-8 in float16) is refused


class OutOfRange(Exception):
    """A feature does not fit the storage dtype."""


def records(outputs: list[np.ndarray], labels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One row of bytes per image: its label, then each output flattened in `dtype`."""
    parts = [labels.astype(LABEL_DTYPE).reshape(-1, 1).view(np.uint8)]
    for output in outputs:
        with np.errstate(over="ignore"):  # an overflow is detected just below
            stored = output.astype(dtype).reshape(len(labels), -1)
        if not np.isfinite(stored).all() and np.isfinite(output).all():
            raise OutOfRange(f"a feature of magnitude {np.abs(output).max():.3g} does not fit {dtype.name}")
        if np.count_nonzero((stored == 0) & (output.reshape(stored.shape) != 0)) > UNDERFLOW_SHARE * output.size:
            raise OutOfRange(f"more than {UNDERFLOW_SHARE:.0%} of the features are too small for {dtype.name}")
        parts.append(stored.view(np.uint8))
    return np.concatenate(parts, axis=1)


class ShardWriter:
    """Rows of bytes into files of at most `per_shard` rows: <split>-00000.bin, <split>-00001.bin, ..."""

    def __init__(self, folder: Path, split: str, per_shard: int):
        self.folder, self.split, self.per_shard = folder, split, per_shard
        self.paths: list[Path] = []
        self.file = None
        self.written = 0

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            room = self.per_shard - self.written % self.per_shard
            if self.written % self.per_shard == 0:
                self._next_file()
            self.file.write(rows[:room].tobytes())
            self.written += len(rows[:room])
            rows = rows[room:]

    def _next_file(self) -> None:
        if self.file is not None:
            self.file.close()
        self.paths.append(self.folder / f"{self.split}-{len(self.paths):05d}.bin")
        self.file = open(self.paths[-1], "wb")

    def close(self) -> tuple[Path, ...]:
        if self.file is not None:
            self.file.close()
        return tuple(self.paths)
