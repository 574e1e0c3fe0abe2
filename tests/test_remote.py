"""Sharing results through a DVC remote: a clone pulls what was pushed and rebuilds only the
TFRecords (push: false), byte for byte, so nothing downstream reruns."""

from __future__ import annotations

from helpers import copy_project, run

STAGES = ("download", "split", "preprocess", "pretrain", "finetune")


def test_clone_pulls_results_and_rebuilds_only_tfrecords(tmp_path, finished_project):
    first = copy_project(finished_project.project, tmp_path / "first")  # after `dvc repro`
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], first)
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "results"], first)
    run(["dvc", "push", "--run-cache"], first)
    assert not list((tmp_path / "remote").rglob("*.tfrecord"))

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    pulled = run(["dvc", "pull", "--run-cache"], second, check=False)  # the TFRecords are not in the remote
    assert "data/tfrecords" in pulled.stdout + pulled.stderr
    assert (second / "models/finetuned.keras").is_file() and not (second / "data/tfrecords").exists()
    result = run(["dvc", "repro"], second)
    assert [stage for stage in STAGES if f"Running stage '{stage}'" in result.stdout] == ["preprocess"]
    assert "modified" not in run(["dvc", "status"], second).stdout
    assert run(["git", "status", "--porcelain"], second).stdout == ""  # dvc.lock unchanged: same TFRecords
