"""params.yaml, validated as a whole before any stage does work.

params.yaml is the one source of truth: nothing here has a default, so a value
the pipeline uses is always written in params.yaml and declared in dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from transfer.errors import PipelineError, describe_validation
from transfer.paths import WEIGHTS

PARAMS_FILE = Path("params.yaml")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
INCEPTION_MIN_SIZE = 75
# len(base.layers) of each backbone, input layer included, whatever the image size: what a freezing rule counts.
# tests/test_models.py builds every backbone and checks this table.
BASE_LAYERS = {"inception_v3": 311, "small_cnn": 7}

ClassName = Literal[CIFAR10_CLASSES]  # type: ignore[valid-type]
PositiveInt = Annotated[int, Field(ge=1)]
# YAML 1.1 reads 1e-4 as a string, so floats accept numeric strings.
PositiveFloat = Annotated[float, Field(gt=0, strict=False)]
Toggle = Literal["auto", True, False]
Keep = Literal["best", "last"]  # training.keep: which epoch a training stage saves and evaluates
# true: the device's mixed dtype (float16 on a GPU, bfloat16 on a CPU); a dtype forces it on any device, so a CPU
# can rehearse what a GPU runs (tests/test_gpu_settings.py).
Precision = Literal["auto", True, False, "float16", "bfloat16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Source(Section):
    """One place the CIFAR-10 archive may be had: an http(s) URL, a file:// URL or a path, and that file's md5."""

    url: str
    md5: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{32}$"), AfterValidator(str.lower)]  # hexdigest() is lowercase


class Data(Section):
    # Tried in order (transfer/fetch.py): copies of the same images may differ in their bytes, so each has its md5.
    sources: Annotated[list[Source], Field(min_length=1)]
    source_classes: Annotated[list[ClassName], Field(min_length=1)]
    target_classes: Annotated[list[ClassName], Field(min_length=1)]
    val_fraction: Annotated[float, Field(gt=0, lt=1, strict=False)]
    max_per_class: PositiveInt | None
    target_labels_per_class: PositiveInt | None

    @model_validator(mode="after")
    def _tasks_are_disjoint(self) -> Data:
        for name in ("source_classes", "target_classes"):
            classes = getattr(self, name)
            if len(set(classes)) != len(classes):
                raise ValueError(f"data.{name} lists a class twice: {classes}")
        shared = sorted(set(self.source_classes) & set(self.target_classes))
        if shared:
            raise ValueError(f"classes in both tasks: {', '.join(shared)}")
        return self


class Preprocess(Section):
    image_size: Annotated[int, Field(ge=8, le=1024)]
    encoding: Literal["jpeg", "raw"]
    jpeg_quality: Annotated[int, Field(ge=1, le=100)]
    shard_size_mb: PositiveFloat
    workers: PositiveInt | None


def _named_weights(weights: str) -> str:
    """imagenet, none, or a file under weights/: a file elsewhere could change without DVC seeing it."""
    path = Path(weights)
    if weights in ("imagenet", "none") or (path.parts[:1] == (WEIGHTS.name,) and ".." not in path.parts):
        return weights
    raise ValueError(f"model.weights: {weights} is not imagenet, none or a file under {WEIGHTS}/; put the weights "
                     f"file in the project's {WEIGHTS}/ folder (pretrain depends on its content) and name it "
                     f"{WEIGHTS}/{path.name}")


class Model(Section):
    backbone: Literal[tuple(BASE_LAYERS)]  # type: ignore[valid-type]
    weights: Annotated[str, AfterValidator(_named_weights)]
    head_units: PositiveInt
    dropout: Annotated[float, Field(ge=0, lt=1, strict=False)]


class Training(Section):
    shuffle_buffer: PositiveInt
    steps_per_execution: PositiveInt
    deterministic: bool
    mixed_precision: Precision
    jit_compile: Toggle
    distribute: Literal["auto", "none", "mirrored", "multi_worker"]
    keep: Keep


class Optimisation(Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    learning_rate: PositiveFloat


class Finetune(Optimisation):
    cache_features: bool
    seed: int


class FreezingRule(Section):
    """Which base layers train: the last `trainable_base_layers` ("all": every one), or all after the first
    `frozen_base_layers` (see transfer/strategies.py)."""

    trainable_base_layers: Annotated[int, Field(ge=0)] | Literal["all"] | None = None
    frozen_base_layers: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _one_freezing_rule(self) -> FreezingRule:
        given = [self.trainable_base_layers is not None, self.frozen_base_layers is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of trainable_base_layers, frozen_base_layers")
        return self


def first_trainable_layer(strategy: FreezingRule, backbone: str) -> int:
    """Index of the first base layer that trains; the base's layer count when only the head trains.

    A count beyond the base is a ValueError starting with the key, rather than
    silently training (or freezing) the whole base.
    """
    base_layers = BASE_LAYERS[backbone]
    if strategy.trainable_base_layers == "all":
        return 0
    if strategy.frozen_base_layers is not None:
        key, count = "frozen_base_layers", strategy.frozen_base_layers
        fix = f"at most {base_layers} ({base_layers} freezes the whole base: only the head trains)"
    else:
        key, count, fix = "trainable_base_layers", strategy.trainable_base_layers, f'"all" or at most {base_layers}'
    if count > base_layers:
        raise ValueError(f"{key}: {count} is more than {backbone}'s {base_layers} base layers; use {fix}")
    return count if key == "frozen_base_layers" else base_layers - count


class Pretrain(Optimisation, FreezingRule):
    """pretrain's settings; a freezing rule other than trainable_base_layers: all caches the frozen part."""


OPTIMIZERS = ("rmsprop", "sgd")  # what a strategy may name (transfer/fitting.py's new_optimizer builds them)


class Strategy(FreezingRule):
    """How much of the pretrained base trains, and optional finetune overrides.

    A warm head (head_epochs > 0) trains the head alone first, for head_epochs at head_learning_rate (finetune's
    learning_rate if not given) with RMSprop; then the strategy's layers train for its epochs at its learning rate
    with its optimizer: the two phases of the Keras fine-tuning recipe (transfer/training.py).
    """

    base_weights: Literal["pretrained", "random"] = "pretrained"
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    learning_rate: PositiveFloat | None = None
    optimizer: Literal[OPTIMIZERS] | None = None  # type: ignore[valid-type]  # None: RMSprop, as finetune trains
    momentum: Annotated[float, Field(ge=0, lt=1, strict=False)] | None = None  # sgd only; none given: 0
    head_epochs: Annotated[int, Field(ge=0)] = 0
    head_learning_rate: PositiveFloat | None = None

    @model_validator(mode="after")
    def _momentum_is_sgds(self) -> Strategy:
        if self.momentum is not None and self.optimizer != "sgd":
            raise ValueError(f"momentum: only sgd takes a momentum, this strategy's optimizer is "
                             f"{self.optimizer or 'rmsprop (the default)'}")
        if self.head_learning_rate is not None and not self.head_epochs:
            raise ValueError("head_learning_rate: set head_epochs too (without a warm head it is unused)")
        return self


class Export(Section):
    license: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.+-]*$")]  # an id of the model hubs' license list


class Params(Section):
    seed: int
    strategy: int
    data: Data
    preprocess: Preprocess
    model: Model
    training: Training
    pretrain: Pretrain
    finetune: Finetune
    strategies: dict[int, Strategy]  # integer keys: DVC sorts them and cannot mix types
    export: Export

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.strategy not in self.strategies:
            known = ", ".join(str(name) for name in self.strategies)
            raise ValueError(f"strategy {self.strategy!r} is not in strategies (known: {known})")
        if self.model.backbone == "inception_v3" and self.preprocess.image_size < INCEPTION_MIN_SIZE:
            raise ValueError(
                f"preprocess.image_size={self.preprocess.image_size} is too small for inception_v3 "
                f"(at least {INCEPTION_MIN_SIZE}); use a larger size or model.backbone=small_cnn"
            )
        if self.model.backbone != "inception_v3" and self.model.weights == "imagenet":
            raise ValueError(
                f"model.weights=imagenet exists only for inception_v3, not {self.model.backbone}; "
                "use none or a path to a weights file"
            )
        try:
            first_trainable_layer(self.pretrain, self.model.backbone)
        except ValueError as error:
            raise ValueError(f"pretrain.{error}") from None
        for number, strategy in self.strategies.items():  # every entry: a sweep may pick any of them
            try:
                first_trainable_layer(strategy, self.model.backbone)
            except ValueError as error:
                raise ValueError(f"strategies.{number}.{error}") from None
        return self

    def chosen_strategy(self) -> Strategy:
        return self.strategies[self.strategy]


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and check params.yaml; any problem is one PipelineError naming the key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run from the project root") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(f"{path}: {describe(error)}") from None


def write_overrides(path: Path, overrides: dict[str, object]) -> None:
    """Set dotted keys ("finetune.epochs", "strategies.2.learning_rate") in a params file."""
    params = yaml.safe_load(Path(path).read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = params
        for key in parents:
            section = section[int(key) if key.isdigit() else key]
        section[leaf] = value
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False))


def describe(error: ValidationError) -> str:
    """The first problem pydantic found, as 'key.path: what is wrong', keys as params.yaml writes them."""
    return describe_validation(error, Params)
