from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import write_learnable_archive  # noqa: E402


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    """12 training and 4 test images per class, official layout."""
    return write_learnable_archive(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz")
