"""params.yaml is checked as a whole: each mistake is one line naming the key."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Annotated, Literal

import pytest
from dvc.utils.hydra import apply_overrides
from helpers import ROOT, TINY_PARAMS, last_line, make_project, md5_of, run_stage, set_params
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from transfer import strategies
from transfer.config import Strategy, load_params
from transfer.errors import PipelineError, describe_validation

BAD_PARAMS = [
    ({"finetune.epoch": 3}, "finetune.epoch: unknown key (allowed: epochs, batch_size, learning_rate"),
    ({"data.val_fraction": 1.5}, "data.val_fraction: got 1.5: Input should be less than 1"),
    ({"data.val_fraction": 0}, "data.val_fraction: got 0: Input should be greater than 0"),
    ({"strategy": 7}, "strategy 7 is not in strategies (known: 0, 1, 2, 3)"),
    ({"data.source_classes": ["airplane", "dogg"]}, "data.source_classes[1]: got 'dogg'; input should be"),
    ({"data.target_classes": ["airplane", "dog"]}, "classes in both tasks: airplane"),
    ({"data.target_classes": []}, "data.target_classes: got []: List should have at least 1 item"),
    ({"pretrain.batch_size": 0}, "pretrain.batch_size: got 0: Input should be greater than or equal to 1"),
    ({"finetune.batch_size": "32"}, "finetune.batch_size: got '32': Input should be a valid integer"),
    ({"preprocess.image_size": 32, "model.backbone": "inception_v3"},
     "preprocess.image_size=32 is too small for inception_v3 (at least 75)"),
    ({"model.backbone": "resnet"}, "model.backbone: got 'resnet'; input should be 'inception_v3' or 'small_cnn'"),
    ({"model.weights": "imagenet"}, "model.weights=imagenet exists only for inception_v3"),
    ({"model.weights": "/tmp/cnn.weights.h5"}, "model.weights: /tmp/cnn.weights.h5 is not imagenet, none or a file "
     "under weights/; put the weights file in the project's weights/ folder (pretrain depends on its content) and "
     "name it weights/cnn.weights.h5"),
    ({"preprocess.encoding": "png"}, "preprocess.encoding: got 'png'; input should be 'jpeg' or 'raw'"),
    ({"strategies.2.trainable_base_layer": 3}, "strategies.2.trainable_base_layer: unknown key (allowed: trainable"),
    ({"strategies.2.frozen_base_layers": 3}, "give exactly one of trainable_base_layers, frozen_base_layers"),
    ({"data.sources.0.md5": "abc"}, "data.sources[0].md5: got 'abc': String should match pattern"),
    ({"data.sources": [{"url": "a.tar.gz", "md5": "0" * 32}, {"url": "b.tar.gz"}]}, "data.sources[1].md5: missing"),
    ({"data.sources": [{"url": "a.tar.gz", "md5": "0" * 32, "sha": "x"}]},
     "data.sources[0].sha: unknown key (allowed: url, md5)"),
    ({"data.sources": [{"url": 7, "md5": "0" * 32}]}, "data.sources[0].url: got 7: Input should be a valid string"),
    ({"data.sources": []}, "data.sources: got []: List should have at least 1 item"),
    ({"data.sources": "https://example.com/c.tar.gz"}, "data.sources: got 'https://example.com/c.tar.gz': Input "
                                                      "should be a valid list"),
    ({"data.url": "https://example.com/c.tar.gz"}, "data.url: unknown key (allowed: sources, source_classes"),
    ({"strategies.3.frozen_base_layers": 249},
     "strategies.3.frozen_base_layers: 249 is more than small_cnn's 7 base layers; use at most 7 "
     "(7 freezes the whole base: only the head trains)"),
    ({"model.backbone": "inception_v3", "preprocess.image_size": 75, "strategies.2.trainable_base_layers": 5000},
     "strategies.2.trainable_base_layers: 5000 is more than inception_v3's 311 base layers"),
    ({"training.mixed_precision": "yes"}, "training.mixed_precision: got 'yes'; input should be 'auto', True, False, "
                                          "'float16' or 'bfloat16'"),
    ({"pretrain.trainable_base_layers": 8}, "pretrain.trainable_base_layers: 8 is more than small_cnn's 7 base layers"),
    ({"pretrain.frozen_base_layers": 2}, "pretrain: give exactly one of trainable_base_layers, frozen_base_layers"),
    ({"pretrain.trainable_base_layers": "some"}, "pretrain.trainable_base_layers: got 'some'"),
    ({"export.license": "Apache 2.0"}, "export.license: got 'Apache 2.0': String should match pattern"),
]


def params_copy(folder: Path, *overrides: dict) -> Path:
    """params.yaml copied into `folder`, with `overrides` applied one after the other."""
    params = folder / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    for each in overrides:
        set_params(params, each)
    return params


@pytest.mark.parametrize(("overrides", "message"), BAD_PARAMS, ids=[next(iter(o)) for o, _ in BAD_PARAMS])
def test_bad_params_are_named(tmp_path, overrides, message):
    params = params_copy(tmp_path, TINY_PARAMS, overrides)
    with pytest.raises(PipelineError) as error:
        load_params(params)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.strategy == 1 and params.chosen_strategy().trainable_base_layers == 0
    assert strategies.settings(params.finetune, params.chosen_strategy()).learning_rate == 0.001


def test_shipped_sources_are_the_local_copy_then_the_official_archive():
    """The same list everywhere: no profile sets data.sources, so one command runs here and on a laptop online."""
    sources = [(source.url, source.md5) for source in load_params(ROOT / "params.yaml").data.sources]
    assert sources == [("../shared/datasets/cifar-10-python.tar.gz", "d5e868226d7d3e3404a638820a2b4477"),
                       ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    for profile in (ROOT / "profiles").glob("*.args"):
        overrides = shlex.split(profile.read_text())[1::2]
        assert not [value for value in overrides if value.startswith("data.sources")], profile


def test_layer_count_errors_name_the_key_on_one_line(tmp_path):
    params = params_copy(tmp_path, TINY_PARAMS, {"strategies.2.trainable_base_layers": 10})
    with pytest.raises(PipelineError) as error:
        load_params(params)
    assert str(error.value) == (f"{params}: strategies.2.trainable_base_layers: 10 is more than small_cnn's "
                                '7 base layers; use "all" or at most 7')


def test_params_yaml_strategies_do_not_fit_small_cnn_alone(tmp_path):
    """Switching the backbone without the profile's strategies is refused, not silently retrained."""
    params = params_copy(tmp_path, {"model.backbone": "small_cnn", "model.weights": "none",
                                    "preprocess.image_size": 32})
    with pytest.raises(PipelineError, match="strategies.2.trainable_base_layers: 10 is more than small_cnn's 7"):
        load_params(params)


@pytest.mark.parametrize("count", [0, 7])
def test_every_count_up_to_the_base_is_allowed(tmp_path, count):
    params = params_copy(tmp_path, TINY_PARAMS, {"strategies.2.trainable_base_layers": count,
                                                 "strategies.3.frozen_base_layers": count})
    entries = load_params(params).strategies
    assert strategies.first_trainable_layer(entries[2], "small_cnn") == 7 - count
    assert strategies.first_trainable_layer(entries[3], "small_cnn") == count


def test_the_cpu_profile_defines_strategies_for_small_cnn(tmp_path):
    """Applied as `dvc exp run -S` applies them; the test projects (TINY_PARAMS) use the same strategies."""
    arguments = shlex.split((ROOT / "profiles/cpu.args").read_text())
    profiled = params_copy(tmp_path)
    apply_overrides(profiled, arguments[1::2])
    params = load_params(profiled)
    names = [strategies.describe(number, strategy, "small_cnn") for number, strategy in params.strategies.items()]
    assert params.model.backbone == "small_cnn"
    # -S merges an entry: strategy 3 is params.yaml's recipe with small_cnn's cut.
    assert names == ["0: from scratch", "1: head only", "2: head + last 2 of small_cnn's 7 base layers",
                     "3: head only for 5 epochs, then head + small_cnn's base layers 3 on (of 7), "
                     "learning_rate 0.0001, optimizer sgd, momentum 0.9"]
    (tmp_path / "tiny").mkdir()
    assert params.strategies == load_params(params_copy(tmp_path / "tiny", TINY_PARAMS)).strategies


DESCRIPTIONS = [
    (0, Strategy(base_weights="random", trainable_base_layers="all"), "small_cnn", "0: from scratch"),
    (1, Strategy(trainable_base_layers=0), "inception_v3", "1: head only"),
    (1, Strategy(frozen_base_layers=7), "small_cnn", "1: head only"),
    (2, Strategy(trainable_base_layers=10), "inception_v3", "2: head + last 10 of inception_v3's 311 base layers"),
    (3, Strategy(frozen_base_layers=249, learning_rate=1e-4), "inception_v3",
     "3: head + inception_v3's base layers 249 on (of 311), learning_rate 0.0001"),
    (4, Strategy(trainable_base_layers=7, epochs=3), "small_cnn", "4: head + the whole base, epochs 3"),
    (5, Strategy(frozen_base_layers=0), "small_cnn", "5: head + the whole base"),
    (6, Strategy(trainable_base_layers=2, head_epochs=2, head_learning_rate=0.01), "small_cnn",
     "6: head only for 2 epochs at learning_rate 0.01, then head + last 2 of small_cnn's 7 base layers"),
    (6, Strategy(base_weights="random", trainable_base_layers=0), "small_cnn", "6: random base, head only"),
]


@pytest.mark.parametrize(("number", "strategy", "backbone", "expected"), DESCRIPTIONS, ids=[d[3] for d in DESCRIPTIONS])
def test_strategy_descriptions(number, strategy, backbone, expected):
    assert strategies.describe(number, strategy, backbone) == expected


def test_md5_in_capitals_is_accepted_and_lowercased(tmp_path, tiny_archive):
    md5 = md5_of(tiny_archive)
    project = make_project(tmp_path / "p", tiny_archive, {"data.sources.0.md5": md5.upper()}, git=False)
    assert load_params(project / "params.yaml").data.sources[0].md5 == md5
    run_stage("download", project, check=True)  # compares it with the archive's (lowercase) hexdigest


def test_strategy_overrides_finetune_settings(tmp_path):
    params = load_params(params_copy(tmp_path, {"strategy": 3}))
    settings = strategies.settings(params.finetune, params.chosen_strategy())
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
    project = make_project(tmp_path / "p", tiny_archive, {"training.jit_compile": True}, git=False)
    result = run_stage("pretrain", project)
    assert result.returncode == 1
    assert last_line(result) == ("error: training.jit_compile=true needs training.deterministic=false: "
                                 "Keras does not compile with XLA under TF op determinism")


def test_frozen_pretrain_profile_trains_only_the_head_in_pretrain(tmp_path):
    profiled = params_copy(tmp_path)
    apply_overrides(profiled, shlex.split((ROOT / "profiles/frozen-pretrain.args").read_text())[1::2])
    params = load_params(profiled)
    assert params.model.backbone == "inception_v3" and params.preprocess.image_size == 299
    assert strategies.describe(1, strategies.pretraining(params), "inception_v3") == "1: head only"
    assert strategies.pretraining(load_params(ROOT / "params.yaml")) is None  # the default: the whole network


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Inner(_Section):
    size: int


class _Outer(_Section):
    """Shapes params.yaml does not have today, that describe_validation must still walk and name."""

    count: int | str | None = None
    ratio: float | str | None = None
    flag: bool | str | None = None
    name: str | int | None = None
    mode: Literal["a", "b"] | int | None = None
    inner: _Inner | None = None
    inners: Annotated[list[_Inner], Field(min_length=1)] | None = None
    checked: int = 0

    @model_validator(mode="after")
    def _small(self) -> _Outer:
        if self.checked >= 5:  # an assert, as pydantic reports it (pytest rewrites this file's own asserts)
            raise AssertionError("checked: at most 4")
        return self


@pytest.mark.parametrize(("data", "message"), [
    # A union's branch names ("int", "str") are not keys; the other branches' complaints are counted.
    ({"count": []}, "count: got []: Input should be a valid integer (and 1 more problem(s))"),
    ({"ratio": []}, "ratio: got []: Input should be a valid number (and 1 more problem(s))"),
    ({"flag": []}, "flag: got []: Input should be a valid boolean (and 1 more problem(s))"),
    ({"name": []}, "name: got []: Input should be a valid string (and 1 more problem(s))"),
    ({"mode": []}, "mode: got []; input should be 'a' or 'b' (and 1 more problem(s))"),
    ({"count": [], "checked": "x"}, "count: got []: Input should be a valid integer (and 2 more problem(s))"),
    # Through an optional section, and an optional list with constraints, to the keys allowed there.
    ({"inner": {"size": 1, "extra": 2}}, "inner.extra: unknown key (allowed: size)"),
    ({"inners": [{"size": 1}, {"siz": 1}]}, "inners[1].size: missing (and 1 more problem(s))"),
    ({"inners": [{"size": 1, "sizes": 1}]}, "inners[0].sizes: unknown key (allowed: size)"),
    ({"checked": 9}, "Assertion failed, checked: at most 4"),  # a check of the whole: no key, no input
])
def test_describe_validation_names_the_key_through_unions_and_optional_sections(data, message):
    with pytest.raises(ValidationError) as error:
        _Outer.model_validate(data)
    assert describe_validation(error.value, _Outer) == message
