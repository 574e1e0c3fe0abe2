"""BatchNorm while fine-tuning: a pretrained base keeps its moving statistics whatever trains (the Keras
transfer-learning recipe), on the plain and the cached path and across a resume; a base trained from random
weights learns them."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import make_project, run_stage

from transfer import checkpoints, strategies
from transfer.checkpoints import Progress
from transfer.config import Strategy, load_params
from transfer.models import base_of, build_base, classifier
from transfer.runtime import set_up
from transfer.training import PRETRAINED, Result, Run, build_classifier, keeps_statistics, open_task, train_classifier

# Trainable parameters (the reference notebook's count for strategy 2, the README's for 3) and trainable
# BatchNorm layers (each has a beta: InceptionV3's have no gamma) of strategies 2 and 3 with 5 classes.
TRAINS = {2: (263_109, 1), 3: (11_377_797, 18)}
INCEPTION_BATCHNORM_LAYERS = 94


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_archive):
    """Target TFRecords at 75 px (54 training images: one batch, one step an epoch) and a "pretrained"
    InceptionV3 classifier: random weights, with moving statistics unlike the initial 0 and 1, as a trained
    base's are."""
    folder = make_project(tmp_path_factory.mktemp("batchnorm") / "p", tiny_archive,
                          {"model.backbone": "inception_v3", "preprocess.image_size": 75, "model.head_units": 128,
                           "finetune.epochs": 1, "finetune.batch_size": 64,
                           "strategies.2.trainable_base_layers": 10, "strategies.3.frozen_base_layers": 249,
                           "strategies.3.head_epochs": 1},  # the recipe's warm head, one epoch of it
                          git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, folder, check=True)
    keras.utils.set_random_seed(0)
    model = classifier(build_base("inception_v3", 75, "none"), "inception_v3", 5, 128, 0.5, base_training=None)
    rng = np.random.default_rng(0)
    for layer in _batchnorm_layers(model):
        layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
        layer.moving_variance.assign(rng.uniform(0.8, 1.25, layer.moving_variance.shape))
    (folder / "models").mkdir()
    model.save(folder / "models/pretrained.keras")
    return folder


@pytest.mark.parametrize(("strategy", "path"), [(2, "cached"), (3, "cached"), (2, "plain, resumed"), (3, "plain")])
def test_a_pretrained_base_keeps_its_batchnorm_statistics_whatever_trains(project, monkeypatch, capsys, strategy,
                                                                         path):
    monkeypatch.chdir(project)
    run = _run(strategy, cache=path == "cached")
    if path == "plain, resumed":  # a checkpoint's .keras file holds plain BatchNorm layers: pinned again?
        run = _stopped_after_epoch_1(run)
    result = _train(run)
    assert result.feature_cache["storage"] == ("disk" if path == "cached" else "none")
    if path == "plain, resumed":
        assert "resuming from" in capsys.readouterr().out
        assert result.progress.epochs_done == 2 and result.kept_epoch == 2
    trainable_params, trainable_batchnorm = TRAINS[strategy]
    assert result.trainable_params == trainable_params  # beta still trains in the layers that train
    learning = _assert_statistics_kept(result.model)
    assert len(learning) == trainable_batchnorm
    for layer, pretrained_beta in learning:
        assert not np.array_equal(layer.beta.numpy(), pretrained_beta.numpy()), layer.name


def test_the_baseline_learns_its_batchnorm_statistics(project, monkeypatch):
    """The baseline's classifier as the trainer builds it: a call in training mode (what each step of fit()
    makes, see test_a_pinned_base_trains_beta_and_saves_as_plain_keras) updates every BatchNorm layer's
    moving statistics. Cheaper than training InceptionV3 from scratch."""
    monkeypatch.chdir(project)
    model = build_classifier(_run(strategies.BASELINE, cache=False), load_params(), 5, 75)
    layers = _batchnorm_layers(model)
    before = [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()) for layer in layers]
    model(np.random.default_rng(0).uniform(0, 255, (4, 75, 75, 3)).astype("float32"), training=True)
    assert len(layers) == INCEPTION_BATCHNORM_LAYERS
    for layer, (mean, variance) in zip(layers, before, strict=True):
        assert not np.array_equal(layer.moving_mean.numpy(), mean), layer.name
        assert not np.array_equal(layer.moving_variance.numpy(), variance), layer.name


@pytest.mark.parametrize(("init", "strategy", "keeps"), [
    (PRETRAINED, Strategy(trainable_base_layers=2), True),  # finetune
    (PRETRAINED, Strategy(trainable_base_layers="all"), True),
    ("none", Strategy(base_weights="random", trainable_base_layers="all"), False),  # the baseline
    ("none", Strategy(base_weights="random", trainable_base_layers=2), False),
    ("imagenet", None, False),  # pretrain, the whole network
    ("imagenet", Strategy(trainable_base_layers=2), True),  # pretrain, partly frozen
    ("weights/base.weights.h5", Strategy(trainable_base_layers=2), True),
    ("none", Strategy(trainable_base_layers=2), False),  # ... from random weights
])
def test_which_bases_keep_their_batchnorm_statistics(init, strategy, keeps):
    run = Run(stage="x", init=init, strategy=strategy, settings=load_params().finetune, seed=0)
    assert keeps_statistics(run) is keeps


def test_a_pinned_base_trains_beta_and_saves_as_plain_keras(tmp_path):
    """The quick check of what Keras does (a two-layer base): base_training=False keeps the statistics
    through fit() while beta trains, base_training=None learns them; the .keras file needs no class of ours."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 2, 16)
    kept = {}
    for base_training in (None, False):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        base = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs)))
        model = classifier(base, "small_cnn", 2, 4, 0.0, base_training=base_training)
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy())
        [layer] = _batchnorm_layers(model)
        before = [variable.numpy().copy() for variable in (layer.moving_mean, layer.moving_variance, layer.beta)]
        model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
        kept[base_training] = [np.array_equal(variable.numpy(), old) for variable, old
                               in zip((layer.moving_mean, layer.moving_variance), before)]
        assert not np.array_equal(layer.beta.numpy(), before[2])
    assert kept == {False: [True, True], None: [False, False]}
    model.save(tmp_path / "model.keras")  # the pinned one
    assert "transfer" not in zipfile.ZipFile(tmp_path / "model.keras").read("config.json").decode()
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "model.keras")(images), model(images), rtol=1e-6)


def _run(strategy: int, cache: bool) -> Run:
    """Strategy `strategy` of the project's params as the finetune stage runs it (the baseline: as the
    baseline stage does)."""
    params = load_params()
    chosen = params.strategies[strategy]
    return Run(stage="baseline" if strategy == strategies.BASELINE else "finetune",
               init=PRETRAINED if chosen.base_weights == "pretrained" else "none", strategy=chosen,
               settings=strategies.settings(params.finetune, chosen), seed=params.finetune.seed,
               cache_features=cache, checkpoints=False)


def _stopped_after_epoch_1(run: Run) -> Run:
    """`run` with 2 epochs and a checkpoint as if it had stopped after epoch 1, its worst (training.keep=best
    then keeps epoch 2, which trains after resuming)."""
    Path("metrics/baseline.json").write_text("{}")  # a dependency of finetune, so part of its identity
    run = dataclasses.replace(run, checkpoints=True, settings=run.settings.model_copy(update={"epochs": 2}))
    model = build_classifier(run, load_params(), 5, 75)
    epoch = {"epoch": 1, "accuracy": 0.0, "loss": 9.0, "val_accuracy": 0.0, "val_loss": 9.0}
    checkpoints.save(checkpoints.for_stage(run.stage, run.settings.batch_size), model, Progress(history=[epoch]),
                     model.get_weights())
    return run


def _train(run: Run) -> Result:
    params = load_params()
    runtime = set_up(params.training.model_copy(update={"mixed_precision": False}), params.seed)
    return train_classifier(run, open_task("target"), params, runtime)


def _batchnorm_layers(model: keras.Model) -> list:
    return [layer for layer in base_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]


def _assert_statistics_kept(model: keras.Model) -> list[tuple]:
    """Every base BatchNorm layer's moving mean and variance are the pretrained model's, bit for bit;
    returns (layer, its pretrained beta) for those that train."""
    pretrained = _batchnorm_layers(keras.models.load_model("models/pretrained.keras"))
    trained = _batchnorm_layers(model)
    assert len(trained) == len(pretrained) == INCEPTION_BATCHNORM_LAYERS
    for layer, before in zip(trained, pretrained, strict=True):
        for name in ("moving_mean", "moving_variance"):
            np.testing.assert_array_equal(getattr(layer, name).numpy(), getattr(before, name).numpy(),
                                          err_msg=f"{layer.name}.{name}")
    return [(layer, before.beta) for layer, before in zip(trained, pretrained) if layer.trainable]
