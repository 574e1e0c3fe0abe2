"""params.yaml is checked as a whole: each mistake is one line naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import ROOT, last_line, make_project, run_stage, set_params

from transfer.config import load_params
from transfer.errors import PipelineError

BAD_PARAMS = [
    ({"finetune.epoch": 3}, "finetune.epoch: unknown key (allowed: epochs, batch_size, learning_rate"),
    ({"data.val_fraction": 1.5}, "data.val_fraction: got 1.5: Input should be less than 1"),
    ({"data.val_fraction": 0}, "data.val_fraction: got 0: Input should be greater than 0"),
    ({"strategy": 7}, "strategy 7 is not in strategies (known: 0, 1, 2, 3)"),
    ({"data.source_classes": ["airplane", "dogg"]}, "data.source_classes.1: got 'dogg'; input should be"),
    ({"data.target_classes": ["airplane", "dog"]}, "classes in both tasks: airplane"),
    ({"data.target_classes": []}, "data.target_classes: got []: List should have at least 1 item"),
    ({"pretrain.batch_size": 0}, "pretrain.batch_size: got 0: Input should be greater than or equal to 1"),
    ({"finetune.batch_size": "32"}, "finetune.batch_size: got '32': Input should be a valid integer"),
    ({"preprocess.image_size": 32, "model.backbone": "inception_v3"},
     "preprocess.image_size=32 is too small for inception_v3 (at least 75)"),
    ({"model.backbone": "resnet"}, "model.backbone: got 'resnet'; input should be 'inception_v3' or 'small_cnn'"),
    ({"model.weights": "imagenet"}, "model.weights=imagenet exists only for inception_v3"),
    ({"preprocess.encoding": "png"}, "preprocess.encoding: got 'png'; input should be 'jpeg' or 'raw'"),
    ({"strategies.2.trainable_base_layer": 3}, "strategies.2.trainable_base_layer: unknown key (allowed: trainable"),
    ({"strategies.2.frozen_base_layers": 3}, "give exactly one of trainable_base_layers, frozen_base_layers"),
    ({"data.md5": "abc"}, "data.md5: got 'abc': String should match pattern"),
    ({"train.mixed_precision": "yes"}, "train.mixed_precision: got 'yes'; input should be 'auto', True or False"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_PARAMS, ids=[next(iter(o)) for o, _ in BAD_PARAMS])
def test_bad_params_are_named(tmp_path, overrides, message):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    set_params(params, {"model.backbone": "small_cnn", "model.weights": "none", "preprocess.image_size": 32})
    set_params(params, overrides)
    with pytest.raises(PipelineError) as error:
        load_params(params)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.strategy == 1 and params.chosen_strategy().trainable_base_layers == 0
    assert params.finetune_settings().learning_rate == 0.001


def test_strategy_overrides_finetune_settings(tmp_path):
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    set_params(params_file, {"strategy": 3})
    settings = load_params(params_file).finetune_settings()
    assert settings.learning_rate == 0.0001 and settings.epochs == 10


@pytest.mark.parametrize("stage", ["download", "split", "preprocess", "baseline", "pretrain", "finetune"])
def test_every_stage_refuses_bad_params_before_work(tmp_path, tiny_archive, stage):
    project = make_project(tmp_path / "p", tiny_archive, {"strategy": 9}, git=False)
    result = run_stage(stage, project)
    assert result.returncode == 1
    assert last_line(result) == "error: params.yaml: strategy 9 is not in strategies (known: 0, 1, 2, 3)"
    assert not (project / "data").exists() or not any((project / "data").iterdir())
    assert "Traceback" not in result.stderr


def test_missing_params_file(tmp_path):
    with pytest.raises(PipelineError, match="nothere.yaml not found"):
        load_params(Path(tmp_path / "nothere.yaml"))


def test_xla_needs_determinism_off(tmp_path, tiny_archive):
    project = make_project(tmp_path / "p", tiny_archive, {"train.jit_compile": True}, git=False)
    result = run_stage("pretrain", project)
    assert result.returncode == 1
    assert last_line(result) == ("error: train.jit_compile=true needs train.deterministic=false: "
                                 "Keras does not compile with XLA under TF op determinism")
