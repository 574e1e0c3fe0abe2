"""params.yaml, validated as a whole before any stage does work.

params.yaml is the one source of truth: nothing here has a default, so a value
the pipeline uses is always written in params.yaml and declared in dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from transfer.errors import PipelineError
from transfer.paths import WEIGHTS
from transfer.strategies import BASE_LAYERS, first_trainable_layer

PARAMS_FILE = Path("params.yaml")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
INCEPTION_MIN_SIZE = 75

ClassName = Literal[CIFAR10_CLASSES]  # type: ignore[valid-type]
PositiveInt = Annotated[int, Field(ge=1)]
# YAML 1.1 reads 1e-4 as a string, so floats accept numeric strings.
PositiveFloat = Annotated[float, Field(gt=0, strict=False)]
Toggle = Literal["auto", True, False]
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
    keep: Literal["best", "last"]


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


class Pretrain(Optimisation, FreezingRule):
    """pretrain's settings; a freezing rule other than trainable_base_layers: all caches the frozen part."""


class Strategy(FreezingRule):
    """How much of the pretrained base trains, and optional finetune overrides."""

    base_weights: Literal["pretrained", "random"] = "pretrained"
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    learning_rate: PositiveFloat | None = None


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
    """The first problem pydantic found, as 'key.path: what is wrong'."""
    first = error.errors()[0]
    location, section = _walk([part for part in first["loc"] if not _is_type_tag(part)])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key (allowed: {', '.join(section.model_fields)})"
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] == "literal_error":
        message = f"got {first['input']!r}; {message[0].lower()}{message[1:]}"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        message = f"got {first['input']!r}: {message}"
    if error.error_count() > 1:
        message += f" (and {error.error_count() - 1} more problem(s))"
    return f"{location}: {message}" if location else message


def _is_type_tag(part: object) -> bool:
    # pydantic names union branches ("int", "literal['all']", "constrained-int") in locations.
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool", "none") or "[" in part or "-" in part
    )


def _walk(location: list) -> tuple[str, type[BaseModel]]:
    """The location as params.yaml's comments and errors write it ("data.sources[0].url", "strategies.2.epochs":
    list items in brackets, mapping keys dotted), and the section that holds its last key."""
    text, annotation, section = "", Params, Params
    for part in location:
        inner = _plain(annotation)
        if get_origin(inner) is list:
            text, annotation = f"{text}[{part}]", get_args(inner)[0]
            continue
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            section = inner
            annotation = inner.model_fields[part].annotation if part in inner.model_fields else None
        else:  # a mapping's key (strategies), or a value with nothing inside
            annotation = get_args(inner)[1] if get_origin(inner) is dict else None
        text = f"{text}.{part}" if text else str(part)
    return text, section


def _plain(annotation: object) -> object:
    """The type inside Annotated[...] and `X | None`, where a location can go on."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        inner = [_plain(arg) for arg in get_args(annotation) if arg is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation
