"""The GPU path, rehearsed on the CPU: what `auto` picks on a GPU, forced by params, through the whole pipeline.

A GPU trains under the mixed_float16 policy, whose optimizer is wrapped in a LossScaleOptimizer (its loss scale
and the count of finite steps since the scale last changed are training state, saved in checkpoints), compiles
with XLA when deterministic is off, and computes the feature cache in float16. One tiny project runs all of that:
pretrain is killed after a checkpointed epoch and resumed by `dvc repro`, which goes on through export.
By default (deterministic: true) a GPU runs under TensorFlow's op determinism instead, which refuses ops that have
no deterministic GPU kernel: the training steps are traced with it on the CPU and checked for such ops.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, epochs_checkpointed, finish, make_project, run, start, wait_until

from transfer.records import dataset, open_split

PRETRAIN_EPOCHS = 6
BATCH = 8
GPU_SETTINGS = {
    "training.mixed_precision": "float16",  # what auto picks with a GPU
    "training.jit_compile": True,  # what auto picks with a GPU and deterministic: false
    "training.deterministic": False,
    "finetune.cache_features": True,
    "strategy": 1,  # the head trains on the frozen base's cached float16 features
    # Enough to learn the tiny archive, so served and measured predictions are not near ties.
    "pretrain.epochs": PRETRAIN_EPOCHS, "pretrain.batch_size": BATCH, "pretrain.learning_rate": 0.003,
    "finetune.epochs": 10, "finetune.learning_rate": 0.01,
}


PLANTED = {"scale": 2.0**10, "counter": 5}  # not a fresh LossScaleOptimizer's state (2**15, 0)


def loss_scale_optimizer(model_file: Path) -> tuple[keras.Model, keras.optimizers.LossScaleOptimizer]:
    """A .keras file's model and its LossScaleOptimizer, loaded as a training stage loads it (after runtime.set_up:
    under the float32 policy Keras would load a plain RMSprop)."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.models.load_model(model_file)
    finally:
        keras.config.set_dtype_policy(policy)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer), type(model.optimizer)
    return model, model.optimizer


def loss_scale_state(model_file: Path) -> dict:
    """Loss scale, finite steps since it last changed, and steps taken, of the optimizer in a .keras file."""
    _, optimizer = loss_scale_optimizer(model_file)
    return {"scale": float(optimizer.dynamic_scale), "counter": int(optimizer.step_counter),
            "steps": int(optimizer.inner_optimizer.iterations)}


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_archive) -> tuple[Path, dict, int]:
    """(the project after a killed and resumed pretrain and `dvc repro` through export, the loss-scale state of the
    checkpoint the resumed run started from, the epochs it had done).

    A tiny run's loss scale may never leave its initial 2**15, or halve after the resume at the same step as a
    fresh optimizer's would: its end state would not tell a restored optimizer from a fresh one. So the killed
    run's checkpoint gets a loss scale and counter of its own (PLANTED) before the resume."""
    project = make_project(tmp_path_factory.mktemp("gpu") / "p", tiny_archive, GPU_SETTINGS)
    run(["dvc", "repro", "preprocess"], project)
    job = start([sys.executable, "-m", "stages.pretrain"], project)
    checkpoints = project / "checkpoints/pretrain"
    wait_until(lambda: epochs_checkpointed(checkpoints) >= 1, job, "a checkpointed epoch")
    os.killpg(job.pid, signal.SIGKILL)
    finish(job)
    done = epochs_checkpointed(checkpoints)
    assert 1 <= done < PRETRAIN_EPOCHS
    model, optimizer = loss_scale_optimizer(checkpoints / "latest/model.keras")
    optimizer.dynamic_scale.assign(PLANTED["scale"])
    optimizer.step_counter.assign(PLANTED["counter"])
    model.save(checkpoints / "latest/model.keras")
    saved = loss_scale_state(checkpoints / "latest/model.keras")
    result = run(["dvc", "repro", "export"], project)  # figures (a stage process, 6 CPU-s) reads nothing tested here
    assert f"resuming from checkpoints/pretrain after epoch {done}" in result.stdout
    return project, saved, done


def metrics(project: Path, stage: str) -> dict:
    return json.loads((project / f"metrics/{stage}.json").read_text())


def test_the_gpu_settings_ran(gpu_run):
    project, _, _ = gpu_run
    for stage in ("baseline", "pretrain", "finetune"):
        assert metrics(project, stage)["runtime"] | {"gpus": 0} == {
            "gpus": 0, "mixed_precision": True, "jit_compile": True, "distribute": "none", "replicas": 1, "workers": 1}
    cache = metrics(project, "finetune")["feature_cache"]
    assert cache["storage"] == "disk" and cache["computed_in"] == "float16", cache
    model = keras.models.load_model(project / "models/finetuned.keras")
    assert model.get_layer("head_dense").dtype_policy.name == "mixed_float16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"


def test_resumed_pretrain_continues_the_loss_scale(gpu_run):
    project, saved, done = gpu_run
    assert {key: saved[key] for key in PLANTED} == PLANTED
    final = loss_scale_state(project / "models/pretrained.keras")
    per_epoch = math.ceil(open_split(project / "data/tfrecords", "source", "train").count / BATCH)
    steps = per_epoch * (PRETRAIN_EPOCHS - done)  # what the resumed run trained
    # A step with non-finite gradients is skipped (the inner optimizer does not count it) and halves the scale;
    # the scale grows only after 2,000 finite steps in a row.
    skipped = steps - (final["steps"] - saved["steps"])
    assert skipped >= 0 and final["scale"] * 2**skipped == saved["scale"], (saved, final, steps)
    if not skipped:
        assert final["counter"] == saved["counter"] + steps, (saved, final, steps)


def test_the_export_serves_float32_probabilities_that_agree_with_the_metrics(gpu_run):
    project, _, _ = gpu_run
    serve = tf.saved_model.load(str(project / "models/export/saved_model")).signatures["pixels"]
    assert serve.structured_outputs["probabilities"].dtype == tf.float32
    probabilities, labels = [], []
    for images, batch_labels in dataset(open_split(project / "data/tfrecords", "target", "test"), 256):
        served = serve(pixels=images)["probabilities"]
        assert served.dtype == tf.float32
        probabilities.append(served.numpy())
        labels.append(batch_labels.numpy())
    probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-6)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    measured = metrics(project, "finetune")["test"]["accuracy"]
    assert measured >= 0.6, measured  # a model that learned: its predictions are no near ties
    assert accuracy == pytest.approx(measured, abs=1e-6)
    assert (project / "models/export/model.tflite").stat().st_size > 0


# Ops whose GPU kernel raises UnimplementedError under TensorFlow's op determinism (OP_REQUIRES(...,
# !OpDeterminismRequired(), errors::Unimplemented(...)) in tensorflow/core/kernels), or that it then runs on the CPU
# (scatter ops). See docs/scaling-out.md, "training.deterministic on a GPU".
NO_DETERMINISTIC_GPU_KERNEL = {
    "FusedBatchNormGrad", "FusedBatchNormGradV2", "FusedBatchNormGradV3",  # with is_training=False: fine-tuning
    "SoftmaxCrossEntropyWithLogits", "SparseSoftmaxCrossEntropyWithLogits",  # the Python API avoids them then
    "Bincount", "DenseBincount", "SparseTensorDenseMatMul", "ResizeNearestNeighborGrad", "AdjustContrastv2",
    "CropAndResizeGradImage", "CropAndResizeGradBoxes", "DebugNumericSummaryV2",
    "ScatterNd", "ScatterNdAdd", "ScatterNdUpdate", "TensorScatterAdd", "TensorScatterSub", "TensorScatterUpdate",
}

TRAINING_STEP_OPS = """
import json, sys
from pathlib import Path
import tensorflow as tf
from transfer.config import Strategy, load_params
from transfer.models import build_base, classifier
from transfer.runtime import set_up
from transfer.strategies import freeze
from transfer.fitting import compile_model

training = load_params(Path(sys.argv[1])).training  # the shipped params: deterministic: true
runtime = set_up(training.model_copy(update={"mixed_precision": "float16"}), 0)  # what a GPU computes in
ops = {}
for name, backbone, size, rule in [("pretrain: the whole InceptionV3 trains", "inception_v3", 75, None),
                                   ("strategy 2: BatchNorm keeps its statistics", "inception_v3", 75,
                                    Strategy(trainable_base_layers=10)),
                                   ("small_cnn", "small_cnn", 32, None)]:
    base = build_base(backbone, size, "none")
    model = classifier(base, backbone, 5, 16, 0.5, base_training=None if rule is None else False)
    if rule is not None:
        freeze(base, rule, backbone)
    compile_model(model, 1e-3, training, runtime)
    batch = (tf.TensorSpec([8, size, size, 3], tf.float32), tf.TensorSpec([8], tf.int64))
    graph = tf.function(model.train_step).get_concrete_function(batch).graph.as_graph_def()
    ops[name] = sorted({node.op for node in graph.node}
                       | {node.op for function in graph.library.function for node in function.node_def})
print(json.dumps(ops))
"""


def test_training_steps_use_only_ops_with_deterministic_gpu_kernels(tmp_path):
    """The training steps a GPU runs by default (op determinism on, mixed_float16, no XLA), traced on the CPU:
    TensorFlow would refuse none of their ops on a GPU."""
    result = run([sys.executable, "-c", TRAINING_STEP_OPS, str(ROOT / "params.yaml")], tmp_path)
    traced = json.loads(result.stdout.splitlines()[-1])
    assert len(traced) == 3
    for name, ops in traced.items():
        assert {"Conv2DBackpropFilter", "IsFinite"} <= set(ops), name  # a training step, with loss scaling
        assert not set(ops) & NO_DETERMINISTIC_GPU_KERNEL, name
        assert "LogSoftmax" in ops, name  # the cross-entropy's deterministic composition
