"""Models: trainable counts per strategy, and the cached frozen prefix against the plain path."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import make_project, run_stage, write_learnable_archive

from transfer import feature_cache, strategies
from transfer.config import INCEPTION_MIN_SIZE, Strategy, load_params
from transfer.errors import PipelineError
from transfer.models import base_of, build_base, classifier, count_params, frozen_prefix
from transfer.paths import RECORDS, feature_cache_folder
from transfer.records import dataset, open_split
from transfer.runtime import set_up
from transfer.strategies import BASE_LAYERS, freeze
from transfer.training import PRETRAINED, Run, build_classifier, labelled_subset, open_task, train_classifier

# The reference notebook's counts for InceptionV3 with 5 target classes.
EXPECTED_TRAINABLE = {1: 262_917, 2: 263_109}


@pytest.fixture(scope="module")
def inception():
    base = build_base("inception_v3", 75, "none")
    return classifier(base, "inception_v3", 5, 128, 0.5, base_training=False)


@pytest.mark.parametrize("strategy", [1, 2, 3])
def test_inception_trainable_counts(inception, strategy):
    entries = load_params().strategies
    freeze(base_of(inception), entries[strategy], "inception_v3")
    trainable = count_params(inception.trainable_weights)
    if strategy in EXPECTED_TRAINABLE:
        assert trainable == EXPECTED_TRAINABLE[strategy]
    else:  # Keras' classic recipe: everything from mixed9 (layer 249) on trains
        assert trainable == 11_377_797
        assert [layer.trainable for layer in base_of(inception).layers].index(True) == 249


def test_all_and_none(inception):
    base = base_of(inception)
    freeze(base, Strategy(trainable_base_layers="all"), "inception_v3")
    assert count_params(inception.trainable_weights) == count_params(inception.weights) - _batchnorm_statistics(base)
    freeze(base, Strategy(trainable_base_layers=0), "inception_v3")
    assert count_params(inception.trainable_weights) == EXPECTED_TRAINABLE[1]


@pytest.mark.parametrize("backbone", sorted(BASE_LAYERS))
def test_base_layer_table_matches_the_backbones(backbone):
    size = INCEPTION_MIN_SIZE if backbone == "inception_v3" else 32
    assert len(build_base(backbone, size, "none").layers) == BASE_LAYERS[backbone]


@pytest.mark.parametrize(("strategy", "trainable"), [
    (Strategy(trainable_base_layers=2), [False] * 5 + [True] * 2),  # the last conv block
    (Strategy(frozen_base_layers=3), [False] * 3 + [True] * 4),  # the last two conv blocks
    (Strategy(trainable_base_layers=7), [True] * 7),
    (Strategy(frozen_base_layers=7), [False] * 7),  # only the head trains
])
def test_small_cnn_freezing(strategy, trainable):
    base = build_base("small_cnn", 32, "none")
    freeze(base, strategy, "small_cnn")
    assert [layer.trainable for layer in base.layers] == trainable


@pytest.mark.parametrize("strategy", [Strategy(trainable_base_layers=10), Strategy(frozen_base_layers=249)])
def test_freeze_refuses_more_layers_than_the_base_has(strategy):
    with pytest.raises(PipelineError, match="is more than small_cnn's 7 base layers"):
        freeze(build_base("small_cnn", 32, "none"), strategy, "small_cnn")


def _batchnorm_statistics(base) -> int:
    return sum(count_params([layer.moving_mean, layer.moving_variance])
               for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.parametrize("strategy", [1, 2])
def test_prefix_and_suffix_compute_the_whole_model(inception, strategy):
    freeze(base_of(inception), load_params().strategies[strategy], "inception_v3")
    prefix, suffix = frozen_prefix(inception)
    assert count_params(prefix.trainable_weights) == 0
    assert count_params(suffix.trainable_weights) == EXPECTED_TRAINABLE[strategy]
    images = np.random.default_rng(0).uniform(0, 255, (3, 75, 75, 3)).astype("float32")
    whole = inception(images, training=False)
    split = suffix(prefix(images, training=False), training=False)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)


def test_nothing_to_cache_when_the_whole_base_trains(inception):
    freeze(base_of(inception), Strategy(trainable_base_layers="all"), "inception_v3")
    assert frozen_prefix(inception) is None


def test_labelled_subset_is_balanced_and_seeded():
    labels = np.repeat(np.arange(5), 40)
    keep = labelled_subset(labels, 7, seed=1)
    assert np.bincount(labels[keep]).tolist() == [7] * 5
    assert np.array_equal(keep, labelled_subset(labels, 7, seed=1))
    assert not np.array_equal(keep, labelled_subset(labels, 7, seed=2))
    assert labelled_subset(labels, None, seed=1) is None


# float16 keeps 11 significant bits: a cached feature is within 2**-11 (4.9e-4) of the plain path's, relative.
FLOAT16_ROUNDING = 2.0**-11


@pytest.fixture(scope="module")
def inception_project(tmp_path_factory):
    """Target TFRecords at 75 px (54 training and 200 test images) and a "pretrained" InceptionV3 classifier
    whose random base is calibrated on them."""
    folder = tmp_path_factory.mktemp("cache")
    archive = write_learnable_archive(folder / "cifar-10-python.tar.gz", test_per_class=40)
    project = make_project(folder / "p", archive,
                           {"model.backbone": "inception_v3", "preprocess.image_size": 75,
                            # 4 batches an epoch, 5 epochs, dropout on (params.yaml's 0.5): 20 steps in which
                            # the order of the data and the dropout masks matter.
                            "finetune.epochs": 5, "finetune.batch_size": 16,
                            "strategies.2.trainable_base_layers": 10},  # cut inside the base, as params.yaml
                           git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    keras.utils.set_random_seed(0)  # the same "pretrained" weights whichever tests ran before in this process
    model = classifier(build_base("inception_v3", 75, "none"), "inception_v3", 5, 16, 0.5, base_training=None)
    # A random InceptionV3's features shrink to about 1e-4 through its 94 BatchNorm layers (moving variance 1),
    # too faint for the head to learn from in a few epochs, and at the edge of float16's normal range. Take
    # every BatchNorm layer's statistics from the target training images instead (momentum 0: one batch sets
    # them): features of about 1, from which the head learns (test accuracy about 0.45 here, chance 0.2).
    images = np.concatenate([x for x, _ in dataset(open_split(project / RECORDS, "target", "train"), 64)])
    for layer in base_of(model).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(images, training=True)
    (project / "models").mkdir()
    model.save(project / "models/pretrained.keras")
    return project


@pytest.mark.parametrize("strategy", [1, 2])
def test_cached_features_train_the_same_model_as_the_plain_path(inception_project, monkeypatch, strategy):
    """Both paths train 5 epochs on the same batches with the same dropout masks (one Dropout layer, seeded by
    the run's seed); the cache's float16 rounding is all that tells them apart.

    Same data order by construction, not by mocking: the cache writes the records in the order the plain path
    reads them (one TFRecord shard), keeps them in one shard (asserted below), so its shard shuffle is the
    identity, and shuffles them with the same seed and buffer (training.shuffle_buffer 64 >= 54 images)."""
    monkeypatch.chdir(inception_project)
    test_images = np.concatenate([images for images, _ in dataset(open_split(RECORDS, "target", "test"), 256)])
    trained = {}
    for cache in (True, False):
        params = load_params()
        runtime = set_up(params.training.model_copy(update={"mixed_precision": False}), params.seed)
        chosen = params.strategies[strategy]
        # No checkpoints: the plain run must not resume from anything.
        run = Run(stage="finetune", init=PRETRAINED, strategy=chosen,
                  settings=strategies.settings(params.finetune, chosen), seed=params.finetune.seed,
                  cache_features=cache, checkpoints=False)
        before = [w.numpy().copy() for w in build_classifier(run, params, 5, 75).trainable_weights]
        result = train_classifier(run, open_task("target"), params, runtime)
        # The trained weights as a function: the whole classifier on the float32 test images, either path
        # (called eagerly: tracing InceptionV3 would cost more than running it on 200 images at 75 px).
        probabilities = result.model(test_images, training=False).numpy()
        trained[cache] = (before, [w.numpy() for w in result.model.trainable_weights], result, probabilities)
        assert not feature_cache_folder("finetune").exists()  # deleted when training ends
    (before, after_cached, cached, probs_cached), (before_plain, after_plain, plain, probs_plain) = (
        trained[True], trained[False])
    assert cached.feature_cache["storage"] == "disk" and plain.feature_cache["storage"] == "none"
    assert cached.feature_cache["dtype"] == "float16"  # what the tolerances below are for
    assert cached.feature_cache["mib"] * 2**20 < feature_cache.SHARD_BYTES  # one shard: see the docstring
    for start_a, start_b in zip(before, before_plain):
        np.testing.assert_array_equal(start_a, start_b)  # same seed, same fresh head

    # Each epoch's training and validation loss: averages of smooth functions of the features, so they move by
    # about the features' relative rounding, not more (measured: 6e-5 at most). Another data order, or
    # labels paired with other features, changes them by percents.
    for epoch_cached, epoch_plain in zip(cached.progress.history, plain.progress.history, strict=True):
        for name in ("loss", "val_loss"):
            assert epoch_cached[name] == pytest.approx(epoch_plain[name], rel=FLOAT16_ROUNDING), epoch_cached
    # Function space. Logits of a few units with that relative error move the probabilities by a few times
    # 2**-11; allow 4x (measured: 1.3e-4 at most, both strategies). Then only near-ties can change the predicted class.
    assert len(probs_plain) == 200 and len(np.unique(plain.test_predicted)) >= 3  # no constant model
    assert np.abs(probs_cached - probs_plain).max() <= 4 * FLOAT16_ROUNDING
    top_two = np.sort(probs_plain, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 8 * FLOAT16_ROUNDING
    # The predictions each path reports (the cached one computed from float16 features).
    same = cached.test_predicted == plain.test_predicted
    assert same[clear].all() and same.mean() >= 0.95
    assert cached.evaluation["test"]["accuracy"] == pytest.approx(plain.evaluation["test"]["accuracy"], abs=0.05)
    assert plain.evaluation["test"]["accuracy"] > 0.3  # it learned (chance: 0.2)

    # Weights: RMSprop divides each gradient component by its root mean square, so a component whose gradient
    # is as small as the rounding noise moves about a learning rate per step in a direction the noise picks,
    # on either path: such a weight need not agree (on AMD EPYC 6 of 192 BatchNorm offsets flipped after one
    # step). Every weight the data steers agrees far below a tenth of the learning rate; the noise-steered ones
    # are a few percent of an array at most (measured: 3 of strategy 2's 192 BatchNorm offsets, none elsewhere).
    tenth_of_a_step = run.settings.learning_rate / 10
    for start, a, b in zip(before, after_cached, after_plain, strict=True):
        assert np.linalg.norm(b - start) > 0  # every trainable array trained
        assert np.mean(np.abs(a - b) > tenth_of_a_step) <= 0.05


def test_weights_file_that_does_not_exist(tmp_path):
    with pytest.raises(PipelineError, match=f"model.weights: {tmp_path}/missing.weights.h5 is not a file"):
        build_base("small_cnn", 32, str(tmp_path / "missing.weights.h5"))


def test_weights_file_initialises_the_base(tmp_path):
    source = build_base("small_cnn", 32, "none")
    source.save_weights(tmp_path / "cnn.weights.h5")
    loaded = build_base("small_cnn", 32, str(tmp_path / "cnn.weights.h5"))
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
