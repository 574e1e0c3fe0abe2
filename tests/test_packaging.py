"""Every documented install resolves to exactly one TensorFlow: tensorflow and tensorflow-cpu own the same files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT

TENSORFLOWS = {"tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos"}
DOCUMENTED_IN = ("README.md", ".ci/run", ".github/workflows/pr-report.yml")


def documented_installs() -> list[str]:
    """The extras of every `pip install -e ".[...]"` in the README, CI script and PR workflow, e.g. "dev,cpu"."""
    found: set[str] = set()
    for name in DOCUMENTED_IN:
        found.update(re.findall(r'pip install (?:--\S+ )*-e "\.\[([\w,]+)\]"', (ROOT / name).read_text()))
    return sorted(found)


def test_the_docs_show_a_cpu_and_a_gpu_install():
    extras = {extra for install in documented_installs() for extra in install.split(",")}
    assert {"cpu", "gpu", "dev"} <= extras, documented_installs()


@pytest.mark.parametrize("extras", documented_installs())
def test_documented_install_has_one_tensorflow(tmp_path, extras):
    report = tmp_path / "report.json"
    # The GPU install resolves tensorflow[and-cuda] from PyPI: about 30 s; the CPU one about 10 s.
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-e", f"{ROOT}[{extras}]"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
             for item in json.loads(report.read_text())["install"]}
    assert len(names & TENSORFLOWS) == 1, f".[{extras}] installs {sorted(names & TENSORFLOWS)}"


def test_requires_python_is_what_the_pinned_dependencies_require_and_the_readme_says():
    """requires-python must be true: pip on an older Python finds no keras 3.15 (it requires 3.11), and the code
    uses 3.11 APIs (hashlib.file_digest). `vermin -t=3.11- transfer stages tools` finds nothing newer."""
    from importlib.metadata import metadata

    declared = re.search(r'requires-python = ">=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert metadata("keras")["Requires-Python"] == f">={declared}"
    assert f"Python {declared} or newer" in (ROOT / "README.md").read_text()
    assert f'target-version = "py{declared.replace(".", "")}"' in (ROOT / "pyproject.toml").read_text()
