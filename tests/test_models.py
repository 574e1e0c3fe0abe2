"""Models: trainable counts per strategy, and the cached frozen prefix against the plain path."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import make_project, run_stage

from transfer import strategies
from transfer.config import INCEPTION_MIN_SIZE, Strategy, load_params
from transfer.errors import PipelineError
from transfer.models import base_of, build_base, classifier, count_params, frozen_prefix
from transfer.paths import feature_cache_folder
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


@pytest.fixture(scope="module")
def inception_project(tmp_path_factory, tiny_archive):
    """Target TFRecords at 75 px and a (randomly initialised) pretrained InceptionV3 classifier."""
    project = make_project(tmp_path_factory.mktemp("cache") / "p", tiny_archive,
                           {"model.backbone": "inception_v3", "preprocess.image_size": 75,
                            # One batch of all 54 training images, no dropout: one step whose gradient does not
                            # depend on the order, which differs between the two paths (the cache shuffles shards).
                            "finetune.epochs": 1, "finetune.batch_size": 64, "model.dropout": 0.0,
                            "strategies.2.trainable_base_layers": 10},  # cut inside the base, as params.yaml
                           git=False)
    for stage in ("download", "split", "preprocess"):
        run_stage(stage, project, check=True)
    keras.utils.set_random_seed(0)  # the same "pretrained" weights whichever tests ran before in this process
    model = classifier(build_base("inception_v3", 75, "none"), "inception_v3", 5, 16, 0.5, base_training=None)
    (project / "models").mkdir()
    model.save(project / "models/pretrained.keras")
    return project


@pytest.mark.parametrize("strategy", [1, 2])
def test_cached_features_train_the_same_model_as_the_plain_path(inception_project, monkeypatch, strategy):
    monkeypatch.chdir(inception_project)
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
        trained[cache] = (before, [w.numpy() for w in result.model.trainable_weights], result.evaluation)
        assert result.feature_cache["storage"] == ("disk" if cache else "none")
        assert not feature_cache_folder("finetune").exists()  # deleted when training ends
    (before_cached, after_cached, eval_cached), (before_plain, after_plain, eval_plain) = trained[True], trained[False]
    for start_a, start_b in zip(before_cached, before_plain):
        np.testing.assert_array_equal(start_a, start_b)  # same seed, same fresh head
    assert any(not np.array_equal(a, b) for a, b in zip(before_cached, after_cached))  # it did train
    for a, b in zip(after_cached, after_plain):  # float16 features: about 5e-4 relative
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert eval_cached["test"]["accuracy"] == pytest.approx(eval_plain["test"]["accuracy"], abs=1e-9)


def test_weights_file_that_does_not_exist(tmp_path):
    with pytest.raises(PipelineError, match=f"model.weights: {tmp_path}/missing.weights.h5 is not a file"):
        build_base("small_cnn", 32, str(tmp_path / "missing.weights.h5"))


def test_weights_file_initialises_the_base(tmp_path):
    source = build_base("small_cnn", 32, "none")
    source.save_weights(tmp_path / "cnn.weights.h5")
    loaded = build_base("small_cnn", 32, str(tmp_path / "cnn.weights.h5"))
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
