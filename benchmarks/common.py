"""What every benchmark shares: a scratch project on the real CIFAR-10 copy, and the RESULT line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

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


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result, sort_keys=True))
