"""The classifier: preprocessing -> base (backbone) -> head; its frozen prefix; model files.

    inputs (0..255) -> preprocess -> base -> pool -> head_dense (relu) -> head_dropout -> predictions

The base is a nested keras Model (see base_of), so `base.layers` indexes exactly like the
Keras application (the reference notebook and Keras' classic fine-tuning
recipe count layers there).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from transfer.errors import PipelineError
from transfer.images import Storage
from transfer.keras_workarounds import keep_batchnorm_statistics, tensors_entering
from transfer.outputs import atomic_output

if TYPE_CHECKING:
    from transfer.runtime import Runtime

HEAD_AFTER_POOL = ("head_dense", "head_dropout", "predictions")
# A file of our own inside the .keras zip (Keras reads only the entries it wrote): the model carries what its
# outputs mean and how its inputs were stored, wherever it is copied (`dvc artifacts get`, --model).
DESCRIPTION_FILE = "transfer.json"
WEIGHTS_HINT = "use -S model.weights=none (random initialisation) or a path to a weights file"


def small_cnn(image_size: int) -> keras.Model:
    """The seed notebook's network: three blocks of a 3x3 convolution and a max-pool."""
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name="small_cnn")


def build_base(backbone: str, image_size: int, weights: str) -> keras.Model:
    """The backbone without its classifier, initialised from `weights` (imagenet, none or a file)."""
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise PipelineError(f"model.weights: {weights} is not a file; {WEIGHTS_HINT}")
    if backbone == "small_cnn":
        base = small_cnn(image_size)
        if weights != "none":
            _load_weights_file(base, weights)
        return base
    try:
        return keras.applications.InceptionV3(
            include_top=False,
            weights=None if weights == "none" else weights,
            input_shape=(image_size, image_size, 3),
        )
    except Exception as error:  # keras raises plain Exception for a failed download
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        what = "download ImageNet weights" if weights == "imagenet" else f"load {weights}"
        raise PipelineError(f"could not {what} for inception_v3 ({reason}); {WEIGHTS_HINT}") from None


def _load_weights_file(base: keras.Model, path: str) -> None:
    try:
        base.load_weights(path)
    except Exception as error:
        raise PipelineError(f"model.weights: cannot load {path} into {base.name} ({error})") from None


def classifier(
    base: keras.Model,
    backbone: str,
    classes: int,
    head_units: int,
    dropout: float,
    *,
    base_training: bool | None,
) -> keras.Model:
    """Wrap `base` with preprocessing and a fresh head.

    base_training=False keeps the base's BatchNorm layers in inference mode even while the head trains, as
    the Keras transfer-learning guide says (see keep_batchnorm_statistics; a model loaded from a file needs it
    again); None lets fit() put them in training mode (pretraining, training from scratch).
    """
    inputs = keras.Input(base.input_shape[1:], name="images")
    if backbone == "inception_v3":  # InceptionV3 expects pixels in [-1, 1]
        x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="preprocess")(inputs)
        pool = keras.layers.GlobalAveragePooling2D(name="pool")
    else:
        x = keras.layers.Rescaling(1 / 255, name="preprocess")(inputs)
        pool = keras.layers.Flatten(name="pool")
    if base_training is False:
        keep_batchnorm_statistics(base)
    x = pool(base(x))
    x = keras.layers.Dense(head_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    # float32 output keeps the softmax stable under mixed precision.
    outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def count_params(variables) -> int:
    return int(sum(variable.numpy().size for variable in variables))


def frozen_prefix(model: keras.Model) -> tuple[keras.Model, keras.Model] | None:
    """Cut `model` before the first base layer that trains: (prefix, suffix), or None.

    The prefix holds no trainable weights and runs in inference mode, so its
    output is the same every epoch; training `suffix` on that output trains
    the same weights as training `model` (they share layers). None when the
    base trains from its first layer, so there is nothing to cache.
    """
    base = base_of(model)
    layers = base.layers
    first = next((i for i, layer in enumerate(layers) if layer.trainable_weights), None)
    if first is not None and first <= 1:
        return None
    images = model.input
    x = model.get_layer("preprocess")(images)
    if first is None:
        features = model.get_layer("pool")(base(x, training=False))
        prefix = keras.Model(images, features, name="frozen_prefix")
        suffix_inputs = [keras.Input(features.shape[1:], name="features")]
        y = suffix_inputs[0]
        for name in HEAD_AFTER_POOL:
            y = model.get_layer(name)(y)
        return prefix, keras.Model(suffix_inputs, y, name="trainable_suffix")
    cut = tensors_entering(layers[first:])
    base_prefix = keras.Model(base.input, cut)
    base_suffix = keras.Model(cut, base.output)
    prefix = keras.Model(images, base_prefix(x, training=False), name="frozen_prefix")
    suffix_inputs = [keras.Input(tensor.shape[1:], name=f"features_{i}") for i, tensor in enumerate(cut)]
    y = model.get_layer("pool")(base_suffix(suffix_inputs))
    for name in HEAD_AFTER_POOL:
        y = model.get_layer(name)(y)
    return prefix, keras.Model(suffix_inputs, y, name="trainable_suffix")


def base_of(model: keras.Model) -> keras.Model:
    """The backbone nested inside a classifier."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


@dataclass(frozen=True)
class Description:
    """What a saved classifier's outputs mean (class names, in output order) and how its training images were
    stored (so predict and the export prepare new images the same way)."""

    classes: tuple[str, ...]
    storage: Storage


def save_model(model: keras.Model, path: Path, runtime: Runtime, description: Description | None = None) -> None:
    """Write the model, with its description if given, whole or not at all; only the chief's copy is kept.

    Across workers saving reads variables collectively, so every worker must save:
    the others write into a temporary folder that is deleted at once.
    """
    if runtime.chief:
        with atomic_output(path) as temporary:
            model.save(temporary)
            if description is not None:
                fields = {"classes": list(description.classes), **vars(description.storage)}
                with zipfile.ZipFile(temporary, "a") as archive:
                    archive.writestr(DESCRIPTION_FILE, json.dumps(fields, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory() as folder:
        model.save(Path(folder) / path.name)


def load_model(path: Path, made_by: str) -> keras.Model:
    """A model a stage wrote; a missing or unreadable file is one line naming it and the stage to rerun."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the {made_by} stage (dvc repro)")
    # Keras calls a file that is no zip archive "not found"; say what is really wrong.
    reason = None if zipfile.is_zipfile(path) else "not a zip archive, as a .keras file is"
    if reason is None:
        try:
            return keras.models.load_model(path)
        except Exception as error:  # Keras raises ValueError, OSError, KeyError... for a damaged file
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise PipelineError(f"{path} is not a readable Keras model ({reason}); rerun the {made_by} stage")


def read_description(path: Path) -> Description:
    """The description save_model stored in a .keras file; a model without one is one line naming it."""
    try:
        with zipfile.ZipFile(path) as archive:
            fields = json.loads(archive.read(DESCRIPTION_FILE))
        storage = Storage(int(fields["image_size"]), str(fields["encoding"]), int(fields["jpeg_quality"]))
        return Description(tuple(str(name) for name in fields["classes"]), storage)
    except KeyError:
        raise PipelineError(f"{path} carries no class names and image format ({DESCRIPTION_FILE}); "
                            "rerun the finetune stage (dvc repro) to save a model with them") from None
    except (OSError, zipfile.BadZipFile, ValueError, TypeError) as error:
        raise PipelineError(f"{path} is not a readable Keras model ({error})") from None


def computing_in(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model` (nested models too) whose layers compute in the dtype policy `policy`, same weights."""
    def with_policy(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": keras.DTypePolicy(policy)})

    copy = keras.models.clone_model(model, clone_function=with_policy, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def every_layer(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of `model`, those of nested models (the base) too."""
    return [inner for layer in model.layers
            for inner in ([layer, *every_layer(layer)] if isinstance(layer, keras.Model) else [layer])]
