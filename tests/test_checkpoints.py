"""A stage's checkpoint identity, read from dvc.yaml: what changes it and what does not."""

from __future__ import annotations

import os

import pytest
import yaml

from transfer.checkpoints import changes, stage_identity
from transfer.errors import PipelineError

DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "python -m stages.train",
            "deps": ["code.py", "data"],
            "params": ["seed", "strategies.2", {"other.yaml": ["lr"]}],
        }
    }
}
PARAMS = {"seed": 1, "unused": 5, "strategies": {1: {"layers": 0}, 2: {"layers": 10}}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "other.yaml").write_text("lr: 0.1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "data" / "part").mkdir(parents=True)
    (tmp_path / "data" / "part" / "a.bin").write_bytes(b"a")
    return tmp_path


def changed_after(edit) -> list[str]:
    before = stage_identity("train")
    edit()
    return changes(before, stage_identity("train"))


def set_param(path, key, value):
    values = yaml.safe_load(path.read_text())
    values[key] = value
    path.write_text(yaml.safe_dump(values))


def test_identity_holds_cmd_dep_contents_and_listed_params(project):
    identity = stage_identity("train")
    assert identity["cmd"] == "python -m stages.train"
    assert set(identity["deps"]) == {"code.py", "data"}
    assert identity["params"] == {"params.yaml:seed": 1, "params.yaml:strategies.2": {"layers": 10},
                                  "other.yaml:lr": 0.1}
    assert changes(identity, stage_identity("train")) == []


def test_a_changed_code_file_changes_the_identity(project):
    assert changed_after(lambda: (project / "code.py").write_text("x = 2\n")) == ["code.py"]


def test_data_folders_count_by_content_names_included(project):
    assert changed_after(lambda: (project / "data/part/a.bin").write_bytes(b"b")) == ["data"]
    assert changed_after(lambda: (project / "data/part/new.bin").write_bytes(b"")) == ["data"]
    assert changed_after(lambda: os.rename(project / "data/part/a.bin", project / "data/part/c.bin")) == ["data"]


def test_touching_a_file_without_changing_it_keeps_the_identity(project):
    assert changed_after(lambda: os.utime(project / "code.py", (0, 0))) == []


def test_listed_params_count_and_others_do_not(project):
    assert changed_after(lambda: set_param(project / "params.yaml", "seed", 2)) == ["seed"]
    assert changed_after(lambda: set_param(project / "params.yaml", "unused", 6)) == []
    strategies = {1: {"layers": 3}, 2: {"layers": 10}}
    assert changed_after(lambda: set_param(project / "params.yaml", "strategies", strategies)) == []
    strategies = {1: {"layers": 3}, 2: {"layers": 11}}
    assert changed_after(lambda: set_param(project / "params.yaml", "strategies", strategies)) == ["strategies.2"]
    assert changed_after(lambda: set_param(project / "other.yaml", "lr", 0.2)) == ["other.yaml:lr"]


def test_a_dependency_added_to_dvc_yaml_joins_the_identity(project):
    (project / "extra.py").write_text("")

    def add_dependency():
        spec = yaml.safe_load((project / "dvc.yaml").read_text())
        spec["stages"]["train"]["deps"].append("extra.py")
        (project / "dvc.yaml").write_text(yaml.safe_dump(spec))

    assert changed_after(add_dependency) == ["extra.py"]


def test_an_unknown_stage_is_one_line(project):
    with pytest.raises(PipelineError, match="dvc.yaml has no stage 'nope'"):
        stage_identity("nope")
