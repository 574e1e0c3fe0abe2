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


# Ten epochs at a small learning rate, so the loss falls steadily and the runs can be compared epoch by epoch.
# No dropout: its masks are drawn per replica, so no distributed run could match the single-device one.
# The baseline (strategies.0) only gives finetune its gain over scratch: one epoch.
TRAINING = {"pretrain.epochs": 10, "finetune.epochs": 10, "pretrain.learning_rate": 0.0005,
            "finetune.learning_rate": 0.0005, "model.dropout": 0.0, "strategies.0.epochs": 1}
GLOBAL_BATCH = 16  # the single-device batch; a run over N replicas gets GLOBAL_BATCH / N per replica


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_archive):
    """Preprocessed tiny data, and pretrain and finetune run once on the default single device."""
    project = make_project(tmp_path_factory.mktemp("distribute") / "single", tiny_archive,
                           {**TRAINING, "pretrain.batch_size": GLOBAL_BATCH, "finetune.batch_size": GLOBAL_BATCH},
                           git=False)
    for stage in ("download", "split", "preprocess", "pretrain", "baseline", "finetune"):
        run_stage(stage, project, check=True)
    return project


def copy_of(project, destination, distribute: str, replicas: int = 1):
    """A copy of the preprocessed project that trains with `distribute` over `replicas` replicas, at the single
    run's global batch: batch sizes are per replica (docs/scaling-out.md)."""
    shutil.copytree(project, destination, ignore=shutil.ignore_patterns("models", "metrics", "checkpoints"))
    (destination / "metrics").mkdir()
    shutil.copy(project / "metrics/baseline.json", destination / "metrics")  # finetune reports its gain over it
    per_replica = GLOBAL_BATCH // replicas
    set_params(destination / "params.yaml", {"training.distribute": distribute, "pretrain.batch_size": per_replica,
                                             "finetune.batch_size": per_replica})
    return destination


def metrics(project, stage: str) -> dict:
    return json.loads((project / f"metrics/{stage}.json").read_text())


def history(project, stage: str) -> list[dict[str, float]]:
    """Every epoch's row of the stage's history CSV."""
    rows = (project / f"metrics/{stage}_history.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,accuracy,val_loss,val_accuracy"
    return [dict(zip(rows[0].split(","), map(float, row.split(",")))) for row in rows[1:]]


def assert_trains_like_the_single_device(project, single, stage: str) -> None:
    """Distributed training lowers the loss and matches the single-device run at the same global batch.

    Both start from the same weights (the same seeded head, and for finetune the same pretrained model) and
    read the same global batches in the same order, so the first epoch is the same run: its training loss (the
    mean over its steps) was the same to the history's six digits in both stages; held to 1e-4 here. Its
    val_loss, after the epoch's last step, differed by 6e-5 (pretrain) and 4e-3 (finetune) relative: the
    replicas' gradients are summed in another order, and RMSprop's steps amplify such differences (a step is
    about lr * sign(g) wherever g is tiny). Later epochs drift further apart (the loss curves by 0.02 to 0.04 on
    average, the final test losses up to 0.09), so only the first epoch is held tight. Breaks measured: a global
    batch of one replica's batch (pretrain's first-epoch loss 1.60031, not 1.62604); finetune's cached features
    batched per replica (1.52865, not 1.53787, while the curves stayed within 0.067 on average and test
    accuracy equal). With gradients not summed across the replicas (each replica applying only its own), the
    curves differed by 0.25 to 0.3 on average.
    """
    ours, theirs = history(project, stage), history(single, stage)
    assert len(ours) == len(theirs) == 10
    assert ours[-1]["loss"] < 0.6 * ours[0]["loss"], f"{stage}: the loss did not fall: {ours}"
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-4), (stage, ours[0], theirs[0])
    assert ours[0]["val_loss"] == pytest.approx(theirs[0]["val_loss"], rel=1e-2), (stage, ours[0], theirs[0])
    deviation = sum(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs)) / len(ours)
    assert deviation <= 0.08, f"{stage}: loss per epoch {ours}, on one device {theirs}"
    for split in ("val", "test"):  # both learned the tiny archive's classes (chance: 0.2)
        assert min(metrics(project, stage)[split]["accuracy"], metrics(single, stage)[split]["accuracy"]) >= 0.6


def test_single_device_runs_without_a_strategy(single):
    for stage in ("pretrain", "finetune"):
        assert metrics(single, stage)["runtime"] | {"gpus": 0} == {
            "gpus": 0, "mixed_precision": False, "jit_compile": False,
            "distribute": "none", "replicas": 1, "workers": 1,
        }


def test_mixed_precision_on_the_cpu_computes_in_bfloat16_and_predicts_in_float32(single, tmp_path):
    import keras
    import numpy as np

    from transfer.records import dataset, open_split

    project = copy_of(single, tmp_path / "mixed", "none")
    set_params(project / "params.yaml", {"training.mixed_precision": True, "pretrain.epochs": 1, "finetune.epochs": 1})
    for stage in ("pretrain", "finetune"):
        run_stage(stage, project, check=True)
        assert metrics(project, stage)["runtime"]["mixed_precision"] is True
    # bfloat16 trains as float32 does: pretrain's epoch, from the same seeded weights over the same batches as the
    # single-device float32 run's first, reached its loss within bfloat16's rounding (2e-4 relative measured; with
    # a learning rate 10 times larger under mixed precision, 4.78 instead of 1.63).
    assert history(project, "pretrain")[0]["loss"] == pytest.approx(history(single, "pretrain")[0]["loss"], rel=2e-3)
    model = keras.models.load_model(project / "models/finetuned.keras")
    assert model.get_layer("head_dense").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"
    assert model.output.dtype == "float32"
    # finetune's test scores are the saved model's, run on the test records without the feature cache (whose
    # float16 storage moved the loss by 4e-5 relative), and its predictions file's. The same weights computed in
    # float32 give other probabilities (1.7e-4 apart measured): the model does compute in bfloat16.
    config = json.dumps(model.get_config()).replace('"mixed_bfloat16"', '"float32"')
    float32 = keras.Model.from_config(json.loads(config))
    float32.set_weights(model.get_weights())
    split = open_split(project / "data/tfrecords", "target", "test")
    ours, theirs, labels = [], [], []
    for images, batch_labels in dataset(split, 64):
        ours.append(model(images, training=False).numpy().astype(np.float64))
        theirs.append(float32(images, training=False).numpy().astype(np.float64))
        labels.append(batch_labels.numpy())
    ours, theirs, labels = map(np.concatenate, (ours, theirs, labels))
    report = metrics(project, "finetune")["test"]
    assert report["loss"] == pytest.approx(np.mean(-np.log(ours[np.arange(len(labels)), labels])), rel=1e-3)
    rows = [row.split(",") for row in (project / "metrics/finetune_predictions.csv").read_text().splitlines()[1:]]
    assert len(rows) == len(labels) and report["accuracy"] == pytest.approx(np.mean([a == p for a, p in rows]))
    assert 1e-5 < np.abs(ours - theirs).max() < 1e-2


def test_mirrored_over_two_cpu_devices(single, tmp_path):
    project = copy_of(single, tmp_path / "mirrored", "mirrored", replicas=2)
    for stage in ("pretrain", "finetune"):  # finetune takes the cached-feature path (strategy 1)
        if stage == "finetune":  # from the single run's pretrained model, so that both finetunes start alike
            shutil.copy(single / "models/pretrained.keras", project / "models/pretrained.keras")
        result = run([sys.executable, "-c", TWO_CPU_DEVICES, stage], project)
        assert "training with mirrored over 2 replicas on 1 worker(s)" in result.stdout
        report = metrics(project, stage)
        assert structure(report) == structure(metrics(single, stage))
        assert report["runtime"]["replicas"] == 2 and report["runtime"]["distribute"] == "mirrored"
        assert report["epochs"] == 10
        assert_trains_like_the_single_device(project, single, stage)
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
    projects = [copy_of(single, tmp_path / f"worker{index}", "auto", replicas=2) for index in range(2)]
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
    assert_trains_like_the_single_device(chief, single, "pretrain")
    assert not any((other / name).exists() for name in OUTPUTS)
    # The chief checkpointed every epoch and, finished, deleted them; the other worker never writes any.
    assert not (chief / "checkpoints/pretrain").exists() and not (other / "checkpoints").exists()
    assert "the chief evaluates and writes the outputs" in outputs[1]


def test_bad_tf_config_is_named(single, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}}')
    result = run_stage("pretrain", single)
    assert result.returncode == 1
    assert last_line(result).startswith("error: TF_CONFIG is not a valid cluster description")
