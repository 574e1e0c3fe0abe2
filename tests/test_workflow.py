"""The pull-request workflow: valid YAML that calls only what exists in the project."""

from __future__ import annotations

import re
import shlex
import shutil

import yaml
from dvc.utils.hydra import apply_overrides
from helpers import ROOT

from transfer.config import load_params

WORKFLOW = ROOT / ".github/workflows/pr-report.yml"
DVC_COMMANDS = ("dvc exp run", "dvc exp branch", "dvc plots diff")


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def scripts() -> str:
    return "\n".join(step.get("run", "") for step in workflow()["jobs"]["report"]["steps"])


def test_runs_on_pull_requests_and_may_comment():
    parsed = workflow()
    assert "pull_request" in parsed[True]  # YAML 1.1 reads the key `on` as true
    assert parsed["permissions"]["pull-requests"] == "write"
    checkout = parsed["jobs"]["report"]["steps"][0]
    assert checkout["uses"].startswith("actions/checkout@") and checkout["with"]["fetch-depth"] == 0
    assert checkout["with"]["persist-credentials"] is False  # the PR's own code must not read the token


def test_every_module_and_file_it_names_exists():
    text = scripts()
    modules = re.findall(r"python -m ([\w.]+)", text)
    assert "tools.report" in modules
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for path in re.findall(r"\b(profiles/[\w.]+)", text):
        assert (ROOT / path).is_file(), path
    assert 'pip install -e ".[dev,cpu]"' in text
    assert re.search(r"cml comment update --target=pr .*report\.md", text)
    for line in re.findall(r"^\s*(?:if )?(dvc [^;$\n]*)", text, flags=re.MULTILINE):
        assert line.startswith(DVC_COMMANDS), line
        assert "--show-md" not in line


def test_ci_runs_the_cpu_profile_whose_sources_reach_the_official_url(tmp_path):
    """A runner has no ../shared: the CPU profile leaves data.sources alone, whose last is the official URL."""
    assert re.findall(r"\bprofiles/[\w.]+", scripts()) == ["profiles/cpu.args", "profiles/cpu.args"]
    cpu = shlex.split((ROOT / "profiles/cpu.args").read_text())
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    apply_overrides(params_file, cpu[1::2])  # as `dvc exp run -S` applies them (Hydra syntax, not YAML)
    params = load_params(params_file)
    assert params.model.backbone == "small_cnn" and params.data.sources[-1].url.startswith("https://")
