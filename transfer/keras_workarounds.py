"""Where the pipeline relies on Keras internals: three workarounds, each for a behaviour of Keras 3.15.

pyproject.toml pins keras to 3.15.x for them. Before raising that cap, read each docstring (what it relies on,
which test shows it still holds) and run those tests: tests/test_distribute.py, tests/test_models.py and
tests/test_batchnorm.py. A workaround whose Keras issue is fixed is deleted, not adapted.

- `let_keras_fit_across_replicas`: private attributes (`Model._symbolic_build`, `Model._distribute_strategy`);
- `tensors_entering`: public `Layer.input`/`Layer.output`, relied on being a layer's first call;
- `keep_batchnorm_statistics`: replaces `call` on layer instances, relying on `Layer.__call__` calling
  `self.call`.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def let_keras_fit_across_replicas(model: keras.Model, batch_spec: tuple, workers: int) -> None:
    """Work around Keras 3's fit() under tf.distribute (keras-team/keras#19246, #20585).

    fit() builds the model from the mean of the first batch over the replicas: that
    fails when the batch does not split evenly (a small validation set) and, across
    workers, always. So the model, its metrics and optimizer are built here from the
    batch's shape, as fit() itself does it, and fit() is told that the model has no
    strategy of its own: it then uses the enclosing scope's and skips that step.
    Across workers, fit() also reduces the scalar logs along an axis they do not
    have, so they get one.

    Private Keras API (`_symbolic_build`, `_distribute_strategy`): keras is pinned to 3.15.x in
    pyproject.toml for it. On an upgrade, check whether those issues are fixed (then delete this
    function) or whether the two attributes still exist and mean the same, by running
    tests/test_distribute.py, whose MirroredStrategy and multi-worker tests go through here.
    """
    model._symbolic_build(data_batch=batch_spec)
    model._distribute_strategy = None
    if workers > 1:
        def with_axis(step):
            return lambda data: {name: tf.reshape(value, [1]) for name, value in step(data).items()}

        model.train_step = with_axis(model.train_step)
        model.test_step = with_axis(model.test_step)


def tensors_entering(suffix_layers: list) -> list:
    """The tensors that enter `suffix_layers` from outside them, in the order the layers read them."""
    # Public Layer.input/.output (Keras 3.15) are the tensors of a layer's first call, which for a base
    # layer is the call that built the backbone, not the classifier's call of the whole base.
    # On a Keras upgrade check that this still holds (each base layer keeps exactly one inbound node) and
    # that tests/test_models.py::test_prefix_and_suffix_compute_the_whole_model passes.
    made_inside = {id(tensor) for layer in suffix_layers for tensor in keras.tree.flatten(layer.output)}
    cut: list = []
    for layer in suffix_layers:
        for tensor in keras.tree.flatten(layer.input):
            if id(tensor) not in made_inside and all(tensor is not seen for seen in cut):
                cut.append(tensor)
    return cut


def keep_batchnorm_statistics(base: keras.Model) -> None:
    """Make each BatchNormalization layer of `base` normalise with its moving mean and variance and never update
    them, whatever `training` it is called with; its gamma and beta still train when the layer is trainable.

    Calling the base with training=False does not do it: in Keras 3.15 a functional model hands its own call's
    `training` to every layer it calls, so fit()'s training=True replaces the False recorded on a nested base.
    Nor does trainable=False, which also freezes gamma and beta. So each layer's `call` is replaced on the
    instance (Layer.__call__ resolves `training`, then calls `self.call`). The .keras file stays plain Keras
    and does not keep this: a model loaded to train on again (a resumed checkpoint) needs it again.
    On a Keras upgrade run tests/test_batchnorm.py.
    """
    for layer in base.layers:  # our bases are flat: no nested model holds BatchNorm layers
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.call = types.MethodType(_normalise_in_inference_mode, layer)


def _normalise_in_inference_mode(layer: keras.layers.BatchNormalization, inputs, training=None, mask=None):
    return type(layer).call(layer, inputs, training=False, mask=mask)
