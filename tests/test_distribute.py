"""The real tf.distribute engine on this CPU: MirroredStrategy over two logical CPU devices, and
MultiWorkerMirroredStrategy with two worker processes talking over 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from helpers import last_line, make_project, run, run_stage, set_params

# Logical devices must exist before TensorFlow starts its runtime, so the stage runs in a fresh process.
TWO_CPU_DEVICES = (
    "import runpy, sys, tensorflow as tf; "
    "tf.config.set_logical_device_configuration(tf.config.list_physical_devices('CPU')[0], "
    "[tf.config.LogicalDeviceConfiguration()] * 2); "
    "runpy.run_module('stages.' + sys.argv[1], run_name='__main__')"
)
OUTPUTS = ("models/pretrained.keras", "metrics/pretrain.json", "metrics/pretrain_history.csv")


def structure(value: object) -> object:
    """The keys of nested dicts, without the values: the metrics format."""
    return {key: structure(item) for key, item in value.items()} if isinstance(value, dict) else None


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_archive):
    """Preprocessed tiny data, and pretrain and finetune run once on the default single device."""
    project = make_project(tmp_path_factory.mktemp("distribute") / "single", tiny_archive,
                           {"pretrain.epochs": 1, "finetune.epochs": 1}, git=False)
    for stage in ("download", "split", "preprocess", "pretrain", "baseline", "finetune"):
        run_stage(stage, project, check=True)
    return project


def copy_of(project, destination, distribute: str):
    shutil.copytree(project, destination, ignore=shutil.ignore_patterns("models", "metrics", "checkpoints"))
    (destination / "metrics").mkdir()
    shutil.copy(project / "metrics/baseline.json", destination / "metrics")  # finetune reports its gain over it
    set_params(destination / "params.yaml", {"train.distribute": distribute})
    return destination


def metrics(project, stage: str) -> dict:
    return json.loads((project / f"metrics/{stage}.json").read_text())


def test_single_device_runs_without_a_strategy(single):
    for stage in ("pretrain", "finetune"):
        assert metrics(single, stage)["runtime"] | {"gpus": 0} == {
            "gpus": 0, "mixed_precision": False, "jit_compile": False,
            "distribute": "none", "replicas": 1, "workers": 1,
        }


def test_mixed_precision_on_the_cpu_computes_in_bfloat16_and_predicts_in_float32(single, tmp_path):
    import keras
    import numpy as np

    project = copy_of(single, tmp_path / "mixed", "none")
    set_params(project / "params.yaml", {"train.mixed_precision": True})
    for stage in ("pretrain", "finetune"):
        run_stage(stage, project, check=True)
        report = metrics(project, stage)
        assert report["runtime"]["mixed_precision"] is True
        assert np.isfinite(report["test"]["loss"]) and 0 <= report["test"]["accuracy"] <= 1
    model = keras.models.load_model(project / "models/finetuned.keras")
    assert model.get_layer("head_dense").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"
    assert model.output.dtype == "float32"


def test_mirrored_over_two_cpu_devices(single, tmp_path):
    project = copy_of(single, tmp_path / "mirrored", "mirrored")
    for stage in ("pretrain", "finetune"):  # finetune takes the cached-feature path (strategy 1)
        result = run([sys.executable, "-c", TWO_CPU_DEVICES, stage], project)
        assert "training with mirrored over 2 replicas on 1 worker(s)" in result.stdout
        report = metrics(project, stage)
        assert structure(report) == structure(metrics(single, stage))
        assert report["runtime"]["replicas"] == 2 and report["runtime"]["distribute"] == "mirrored"
        assert report["epochs"] == 1 and 0 <= report["test"]["accuracy"] <= 1
        history = (project / f"metrics/{stage}_history.csv").read_text().splitlines()
        assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy" and len(history) == 2
    assert (project / "models/finetuned.keras").is_file()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_multi_worker_over_two_processes(single, tmp_path):
    """Two workers, each in its own copy of the project as on two machines: only the chief writes."""
    projects = [copy_of(single, tmp_path / f"worker{index}", "auto") for index in range(2)]
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    try:
        for index, project in enumerate(projects):
            config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            environment = {**os.environ, "TF_CONFIG": json.dumps(config), "PYTHONUNBUFFERED": "1"}
            workers.append(subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=project, env=environment,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            start_new_session=True))
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
        assert "training with multi_worker over 2 replicas on 2 worker(s)" in output
    chief, other = projects
    report = metrics(chief, "pretrain")
    assert structure(report) == structure(metrics(single, "pretrain"))
    assert report["runtime"] | {"gpus": 0} == {"gpus": 0, "mixed_precision": False, "jit_compile": False,
                                              "distribute": "multi_worker", "replicas": 2, "workers": 2}
    assert all((chief / name).exists() for name in OUTPUTS)
    assert not any((other / name).exists() for name in OUTPUTS)
    # The chief checkpointed every epoch and, finished, deleted them; the other worker never writes any.
    assert not (chief / "checkpoints/pretrain").exists() and not (other / "checkpoints").exists()
    assert "the chief evaluates and writes the outputs" in outputs[1]


def test_bad_tf_config_is_named(single, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}}')
    result = run_stage("pretrain", single)
    assert result.returncode == 1
    assert last_line(result).startswith("error: TF_CONFIG is not a valid cluster description")
