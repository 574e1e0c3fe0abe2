"""What a fine-tuning strategy means: which base layers train, for each backbone, its settings and its phases.

A strategy (an entry of params.yaml's `strategies`) counts layers in `base.layers` of
the backbone, as the Keras application lists them (input layer included), so the
same number means the same cut on every machine; a count beyond the backbone's
base is refused. Strategy 0 is the from-scratch baseline. The counting itself (BASE_LAYERS,
first_trainable_layer) is transfer/config.py's, which validates every strategy when it reads the params.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from transfer.config import BASE_LAYERS, Finetune, FreezingRule, Optimisation, Params, Strategy, first_trainable_layer
from transfer.errors import PipelineError

if TYPE_CHECKING:
    import keras

BASELINE = 0  # the strategy the baseline stage trains, whatever `strategy` says


def freeze(base: keras.Model, strategy: FreezingRule, backbone: str) -> None:
    """Make the base's layers trainable or not as the strategy says (the head always trains)."""
    try:
        first = first_trainable_layer(strategy, backbone)
    except ValueError as error:  # params validation catches this first; a Strategy made in code may not
        raise PipelineError(str(error)) from None
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= first


@dataclass(frozen=True)
class Phase:
    """Part of a training run with one freezing rule and one optimizer: a warm head makes two, any other run one."""

    number: int | None  # the history's `phase` column; None: the one phase of a run without a warm head
    rule: FreezingRule | None  # which base layers train; None: the whole network
    start: int  # the run's epochs before the phase
    until: int  # the run's epochs at the phase's end
    learning_rate: float
    optimizer: str = "rmsprop"  # config.OPTIMIZERS
    momentum: float | None = None  # sgd's


def phases(strategy: Strategy | None, settings: Optimisation, finetune_learning_rate: float,
           backbone: str) -> list[Phase]:
    """A run's phases: with a warm head (head_epochs) first the head alone for head_epochs at head_learning_rate
    (default: finetune's learning rate) with RMSprop, then the strategy's layers for settings.epochs at
    settings.learning_rate with the strategy's optimizer (the Keras fine-tuning recipe); else that alone."""
    optimizer, momentum = (strategy.optimizer, strategy.momentum) if strategy is not None else (None, None)
    own = Phase(None, strategy, 0, settings.epochs, settings.learning_rate, optimizer or "rmsprop", momentum)
    head_epochs = strategy.head_epochs if strategy is not None else 0
    if not head_epochs:
        return [own]
    head_only = FreezingRule(frozen_base_layers=BASE_LAYERS[backbone])
    return [Phase(1, head_only, 0, head_epochs, strategy.head_learning_rate or finetune_learning_rate),
            replace(own, number=2, start=head_epochs, until=head_epochs + settings.epochs)]


def settings(finetune: Finetune, strategy: Strategy) -> Finetune:
    """finetune's epochs, batch size and learning rate after the strategy's overrides."""
    overrides = {name: getattr(strategy, name) for name in ("epochs", "batch_size", "learning_rate")}
    return finetune.model_copy(update={name: value for name, value in overrides.items() if value is not None})


def pretraining(params: Params) -> Strategy | None:
    """pretrain's freezing rule as a strategy over model.weights; None when the whole network trains."""
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
    """Strategy `number` in words, for legends and reports: "2: head + last 2 of small_cnn's 7 base layers"; a warm
    head names its phases: "3: head only for 5 epochs, then head + inception_v3's base layers 249 on (of 311),
    learning_rate 0.0001, optimizer sgd, momentum 0.9" (the settings after the phases are the second's)."""
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
    if strategy.head_epochs:
        rate = "" if strategy.head_learning_rate is None else f" at learning_rate {strategy.head_learning_rate}"
        trains = f"head only for {strategy.head_epochs} epochs{rate}, then {trains}"
    overrides = [f"{name} {value}" for name in ("epochs", "batch_size", "learning_rate", "optimizer", "momentum")
                 if (value := getattr(strategy, name)) is not None]
    return ", ".join([f"{number}: {trains}", *overrides])
