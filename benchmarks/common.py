"""What every benchmark shares: a scratch project on the real CIFAR-10 copy, and the RESULT line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from transfer.cifar10 import Cifar10, read_archive, write_archive
from transfer.config import write_overrides

ROOT = Path(__file__).resolve().parents[1]
LOCAL_ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar-10-python.tar.gz"
LOCAL_MD5 = "d5e868226d7d3e3404a638820a2b4477"


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--archive", type=Path, default=LOCAL_ARCHIVE, help="CIFAR-10 archive (official layout)")
    parser.add_argument("--md5", default=LOCAL_MD5, help="md5 of --archive")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/benchmarks"), help="scratch folder")
    return parser


def workspace(name: str, args: argparse.Namespace, overrides: dict[str, object]) -> Path:
    """A fresh folder holding params.yaml with `overrides`, made the working directory."""
    folder = args.workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    write_overrides(folder / "params.yaml",
                    {"data.url": str(args.archive.resolve()), "data.md5": args.md5, **overrides})
    os.chdir(folder)
    return folder


def archive_share(source: Path, fraction: float, folder: Path) -> tuple[Path, str]:
    """A copy of the archive with the first `fraction` of every class, train and test: (path, md5).

    Every split keeps the proportions of the full pipeline, at a fraction of its cost.
    """
    cifar = read_archive(source)

    def share(labels: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([members[:round(fraction * len(members))]
                                       for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]))

    train, test = share(cifar.train_labels), share(cifar.test_labels)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_archive(folder / f"cifar-10-{fraction:g}.tar.gz", Cifar10(
        cifar.train_images[train], cifar.train_labels[train], cifar.test_images[test], cifar.test_labels[test],
        cifar.class_names))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result, sort_keys=True))
