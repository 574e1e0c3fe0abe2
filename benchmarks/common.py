"""What every benchmark shares: a scratch project on the real CIFAR-10 copy, its stages run, and the RESULT line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from transfer.cifar10 import Cifar10, read_archive, write_archive
from transfer.config import write_overrides

ROOT = Path(__file__).resolve().parents[1]
LOCAL_ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar-10-python.tar.gz"
LOCAL_MD5 = "d5e868226d7d3e3404a638820a2b4477"


def arguments(description: str, archive: bool = True) -> argparse.ArgumentParser:
    """--workdir, and --archive and --md5 for a benchmark that builds its project from an archive (`archive`)."""
    parser = argparse.ArgumentParser(description=description)
    if archive:
        parser.add_argument("--archive", type=Path, default=LOCAL_ARCHIVE, help="CIFAR-10 archive (official layout)")
        parser.add_argument("--md5", default=LOCAL_MD5, help="md5 of --archive")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/benchmarks"), help="scratch folder")
    return parser


# params.yaml's strategies 2 and 3 count InceptionV3's layers; small_cnn runs take the CPU profile's.
SMALL_CNN_STRATEGIES = {"strategies.2.trainable_base_layers": 2, "strategies.3.frozen_base_layers": 3}
# What a stage reads from the project root: its params, and dvc.yaml with the code it names (a training
# stage's checkpoint identity is everything dvc.yaml lists for it, weights/ included).
PROJECT_FILES = ("params.yaml", "dvc.yaml", "stages", "transfer", "weights")
STDERR_TAIL_LINES = 20  # enough for a Python traceback's last frames and the error itself


def workspace(name: str, args: argparse.Namespace, overrides: dict[str, object]) -> Path:
    """A fresh copy of the project with `overrides` in its params.yaml, made the working directory."""
    folder = args.workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for item in PROJECT_FILES:
        if (ROOT / item).is_dir():
            shutil.copytree(ROOT / item, folder / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / item, folder / item)
    small_cnn = overrides.get("model.backbone") == "small_cnn"
    write_overrides(folder / "params.yaml", {"data.sources": [{"url": str(args.archive.resolve()), "md5": args.md5}],
                                             **(SMALL_CNN_STRATEGIES if small_cnn else {}), **overrides})
    os.chdir(folder)
    return folder


def prepared(name: str, args: argparse.Namespace, overrides: dict[str, object], stages: tuple[str, ...]) -> bool:
    """Work in args.workspace, an earlier run's workspace, if given (False); else in a fresh workspace on
    args.fraction of every class of the archive, with `stages` run (True)."""
    if args.workspace:
        os.chdir(args.workspace)
        return False
    if args.fraction < 1:
        args.archive, args.md5 = archive_share(args.archive, args.fraction, args.workdir)
    workspace(name, args, overrides)
    run_stages(*stages)
    return True


def pretrained_stand_in(backbone: str, image_size: int, trained: bool, weights_from: Path | None = None,
                        classes: int = 5) -> None:
    """Where the pretrain stage saves its model: that model (trained), or a classifier standing in for it without
    the pretrain stage's cost: randomly initialised (seed 0), or with the weights of the model file weights_from,
    pretrained at any image size (InceptionV3's weights do not depend on it). Either way with its
    BatchNormalization statistics measured on CALIBRATION_IMAGES of the source task's training images
    (calibrate_batchnorm), at this image size.

    A random base needs it so that its features are not vanishingly small; a base pretrained a few epochs from
    random weights needs it because its moving statistics still lag its weights: on 5% of CIFAR-10 at 75 px, 8
    epochs in, its source validation accuracy was 0.19 with them and 0.32 with measured ones, and a linear head on
    its target features reached 0.44 (chance 0.2). Measuring again changes nothing: the statistics of the same
    images in training mode do not depend on the moving ones. Whether a head learns from a random base depends
    on the data: on the tests' colour-coded images at 299 px it does (tests/test_reference_resolution.py); on 2%
    of CIFAR-10 at 75 px, strategy 1, it stayed at chance (finetune_cache, test accuracy 0.19, commit 0530e08)."""
    import keras

    from transfer.config import load_params
    from transfer.models import build_base, classifier
    from transfer.paths import PRETRAINED_MODEL, RECORDS
    from transfer.records import dataset, open_split

    if trained:
        model = keras.models.load_model(PRETRAINED_MODEL)
    else:
        keras.utils.set_random_seed(0)
        model = classifier(build_base(backbone, image_size, "none"), backbone, classes,
                           load_params().model.head_units, 0.5, base_training=None)
        if weights_from is not None:
            model.set_weights(keras.models.load_model(weights_from).get_weights())
    images, _ = next(iter(dataset(open_split(RECORDS, "source", "train"), CALIBRATION_IMAGES)))
    calibrate_batchnorm(model, images, batch_size=CALIBRATION_BATCH_PIXELS // image_size**2)
    PRETRAINED_MODEL.parent.mkdir(exist_ok=True)
    model.save(PRETRAINED_MODEL)


CALIBRATION_IMAGES = 256
CALIBRATION_BATCH_PIXELS = 256 * 75 * 75  # a forward pass in training mode holds a batch's activations


def calibrate_batchnorm(model, images, batch_size: int | None = None) -> None:
    """Make every BatchNormalization layer's moving statistics those of `images` (pixels as `model` takes them),
    in forward passes in training mode: all at once, or over batches of batch_size, averaging each batch's mean
    and variance (momentum (k - 1) / k for the k-th batch; the first one sets them).

    A random network's statistics (mean 0, variance 1) do not match its activations: through InceptionV3 they
    shrink layer after layer to pooled features of about 2e-4 at 299 px, nearly the same for every image, and a
    head stays at chance (BENCHMARKS.md, the reference resolution). With measured statistics the features are of
    order 0.1 to 1 and keep what tells the images apart: a stand-in for trained weights where ImageNet's cannot be
    downloaded (tests/test_reference_resolution.py uses it too)."""
    import keras

    from transfer.models import every_layer

    norms = [layer for layer in every_layer(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [norm.momentum for norm in norms]
    size = batch_size or len(images)
    for k, start in enumerate(range(0, len(images), size), start=1):
        for norm in norms:
            norm.momentum = (k - 1) / k
        model(images[start:start + size], training=True)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def run_stages(*names: str) -> None:
    """Run the named pipeline stages in order, in the working directory (a workspace), as dvc.yaml runs them.

    A subprocess each, `python -m stages.<name>`, so that a benchmark builds its data with the workspace's own
    copy of the stages and never imports them. Their messages pass through; a failure ends the benchmark with
    the stage's last lines of stderr.
    """
    for name in names:
        result = subprocess.run([sys.executable, "-m", f"stages.{name}"], stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
            raise SystemExit(f"benchmark: `python -m stages.{name}` failed (exit code {result.returncode}):\n{tail}")


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
