"""What a fine-tuning strategy means: which base layers train, for each backbone, and its settings.

A strategy (an entry of params.yaml's `strategies`) counts layers in `base.layers` of
the backbone, as the Keras application lists them (input layer included), so the
same number means the same cut on every machine; a count beyond the backbone's
base is refused. Strategy 0 is the from-scratch baseline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transfer.errors import PipelineError

if TYPE_CHECKING:  # config imports this module to validate strategies
    import keras

    from transfer.config import Finetune, FreezingRule, Params, Strategy

# len(base.layers) of each backbone, input layer included, whatever the image size.
# tests/test_models.py builds every backbone and checks this table.
BASE_LAYERS = {"inception_v3": 311, "small_cnn": 7}
BASELINE = 0  # the strategy the baseline stage trains, whatever `strategy` says


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


def freeze(base: keras.Model, strategy: FreezingRule, backbone: str) -> None:
    """Make the base's layers trainable or not as the strategy says (the head always trains)."""
    try:
        first = first_trainable_layer(strategy, backbone)
    except ValueError as error:  # params validation catches this first; a Strategy made in code may not
        raise PipelineError(str(error)) from None
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= first


def settings(finetune: Finetune, strategy: Strategy) -> Finetune:
    """finetune's epochs, batch size and learning rate after the strategy's overrides."""
    overrides = {name: getattr(strategy, name) for name in ("epochs", "batch_size", "learning_rate")}
    return finetune.model_copy(update={name: value for name, value in overrides.items() if value is not None})


def pretraining(params: Params) -> Strategy | None:
    """pretrain's freezing rule as a strategy over model.weights; None when the whole network trains."""
    from transfer.config import Strategy

    rule = params.pretrain
    if rule.trainable_base_layers == "all":
        return None
    return Strategy(trainable_base_layers=rule.trainable_base_layers, frozen_base_layers=rule.frozen_base_layers)


def baseline(params: Params) -> Strategy:
    """Strategy 0, which must train from random weights: the no-transfer baseline."""
    chosen = params.strategies.get(BASELINE)
    if chosen is None or chosen.base_weights != "random":
        raise PipelineError(f"params.yaml: strategies.{BASELINE} must be the from-scratch baseline "
                            "(base_weights: random)")
    return chosen


def describe(number: int, strategy: Strategy, backbone: str) -> str:
    """Strategy `number` in words, for legends and reports: "2: head + last 2 of small_cnn's 7 base layers"."""
    layers = BASE_LAYERS[backbone]
    first = first_trainable_layer(strategy, backbone)
    if first == 0:
        trains = "from scratch" if strategy.base_weights == "random" else "head + the whole base"
    elif first == layers:
        trains = "head only"
    elif strategy.frozen_base_layers is not None:
        trains = f"head + {backbone}'s base layers {first} on (of {layers})"
    else:
        trains = f"head + last {layers - first} of {backbone}'s {layers} base layers"
    if strategy.base_weights == "random" and first > 0:
        trains = f"random base, {trains}"
    overrides = [f"{name} {value}" for name in ("epochs", "batch_size", "learning_rate")
                 if (value := getattr(strategy, name)) is not None]
    return ", ".join([f"{number}: {trains}", *overrides])
