"""A stage's checkpoint identity, read from dvc.yaml: what changes it and what does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from transfer.checkpoints import changes, stage_identity
from transfer.errors import PipelineError

DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "python -m stages.train",
            "deps": ["code.py", "data"],
            "params": ["seed", "strategies.2", {"other.yaml": ["lr"]}],
        }
    }
}
PARAMS = {"seed": 1, "unused": 5, "strategies": {1: {"layers": 0}, 2: {"layers": 10}}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "other.yaml").write_text("lr: 0.1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "data" / "part").mkdir(parents=True)
    (tmp_path / "data" / "part" / "a.bin").write_bytes(b"a")
    return tmp_path


def changed_after(edit) -> list[str]:
    before = stage_identity("train")
    edit()
    return changes(before, stage_identity("train"))


def set_param(path, key, value):
    values = yaml.safe_load(path.read_text())
    values[key] = value
    path.write_text(yaml.safe_dump(values))


def test_identity_holds_cmd_dep_contents_and_listed_params(project):
    identity = stage_identity("train")
    assert identity["cmd"] == "python -m stages.train"
    assert set(identity["deps"]) == {"code.py", "data"}
    assert identity["params"] == {"params.yaml:seed": 1, "params.yaml:strategies.2": {"layers": 10},
                                  "other.yaml:lr": 0.1}
    assert changes(identity, stage_identity("train")) == []


def test_a_changed_code_file_changes_the_identity(project):
    assert changed_after(lambda: (project / "code.py").write_text("x = 2\n")) == ["code.py"]


def test_data_folders_count_by_content_names_included(project):
    assert changed_after(lambda: (project / "data/part/a.bin").write_bytes(b"b")) == ["data"]
    assert changed_after(lambda: (project / "data/part/new.bin").write_bytes(b"")) == ["data"]
    assert changed_after(lambda: os.rename(project / "data/part/a.bin", project / "data/part/c.bin")) == ["data"]


def test_touching_a_file_without_changing_it_keeps_the_identity(project):
    assert changed_after(lambda: os.utime(project / "code.py", (0, 0))) == []


def test_listed_params_count_and_others_do_not(project):
    assert changed_after(lambda: set_param(project / "params.yaml", "seed", 2)) == ["seed"]
    assert changed_after(lambda: set_param(project / "params.yaml", "unused", 6)) == []
    strategies = {1: {"layers": 3}, 2: {"layers": 10}}
    assert changed_after(lambda: set_param(project / "params.yaml", "strategies", strategies)) == []
    strategies = {1: {"layers": 3}, 2: {"layers": 11}}
    assert changed_after(lambda: set_param(project / "params.yaml", "strategies", strategies)) == ["strategies.2"]
    assert changed_after(lambda: set_param(project / "other.yaml", "lr", 0.2)) == ["other.yaml:lr"]


def test_a_dependency_added_to_dvc_yaml_joins_the_identity(project):
    (project / "extra.py").write_text("")

    def add_dependency():
        spec = yaml.safe_load((project / "dvc.yaml").read_text())
        spec["stages"]["train"]["deps"].append("extra.py")
        (project / "dvc.yaml").write_text(yaml.safe_dump(spec))

    assert changed_after(add_dependency) == ["extra.py"]


def test_an_unknown_stage_is_one_line(project):
    with pytest.raises(PipelineError, match="dvc.yaml has no stage 'nope'"):
        stage_identity("nope")


def test_a_resumed_fit_keeps_the_best_epoch_of_an_uninterrupted_one(tmp_path):
    """training.keep=best across an interruption: the checkpoint carries the best weights so far, so a run
    stopped after its best epoch and resumed ends with the same kept epoch and weights as one never stopped."""
    import keras
    import numpy as np
    import tensorflow as tf

    from transfer.checkpoints import Checkpoints, Progress, resume
    from transfer.config import Training
    from transfer.fitting import compile_model, fit
    from transfer.runtime import set_up

    training = Training(shuffle_buffer=64, steps_per_execution=1, deterministic=True, mixed_precision=False,
                        jit_compile=False, distribute="none", keep="best")
    runtime = set_up(training, seed=0)
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(90, 8)).astype("float32")
    labels = (inputs @ rng.normal(size=(8, 3))).argmax(axis=1)
    train = tf.data.Dataset.from_tensor_slices((inputs[:60], labels[:60]))
    val = tf.data.Dataset.from_tensor_slices((inputs[60:], labels[60:])).batch(8)

    def epoch_data(epoch: int) -> tf.data.Dataset:
        return train.shuffle(60, seed=epoch).batch(8)

    def fitted(epochs: int, folder: str, model: keras.Model | None = None, progress: Progress | None = None):
        if model is None:
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                      keras.layers.Dense(3, activation="softmax")])
        compile_model(model, 1.0, training, runtime, optimizer=getattr(model, "optimizer", None))  # erratic
        saved = Checkpoints(tmp_path / folder, {"cmd": "test", "deps": {}, "params": {}})
        progress = fit(model, epoch_data, val, epochs, progress or Progress(), 60, runtime, saved, keep="best")
        return model, progress, saved

    epochs = 8
    whole, whole_progress, _ = fitted(epochs, "whole")
    kept = whole_progress.kept_epoch("best")
    scores = [entry["val_accuracy"] for entry in whole_progress.history]
    assert kept == max(epoch for epoch, score in enumerate(scores, 1) if score == max(scores))
    assert kept < epochs and scores[kept - 1] > scores[-1]  # the best is not the last: keeping it matters
    _, _, stopped = fitted(kept, "stopped")  # its checkpoint is what a kill after the best epoch leaves
    model, progress = resume(stopped, workers=1, chief=True)
    assert progress.epochs_done == kept
    resumed, resumed_progress, _ = fitted(epochs, "stopped", model, progress)
    assert resumed_progress.history == whole_progress.history and resumed_progress.kept_epoch("best") == kept
    for ours, theirs in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    last = resumed.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    assert last == pytest.approx(scores[kept - 1])  # the model holds the kept epoch's weights, not the last's


# Replacing an output or a checkpoint: a kill between any two steps leaves the old or the new version.

STEPS = ("flush the new version", "mark the new version complete", "set the old version aside",
         "move the new version in", "delete the old version")
REPLACE = """
import os, sys
from pathlib import Path
from transfer import outputs

outputs._before_step = lambda step: os._exit(9) if step == sys.argv[1] else None
final = Path(sys.argv[2])
with outputs.atomic_output(final) as temporary:  # a file, or a folder of two files, holding sys.argv[3]
    if final.suffix == ".txt":
        temporary.write_text(sys.argv[3])
    else:
        temporary.mkdir()
        for name in ("a", "b"):
            (temporary / name).write_text(sys.argv[3])
"""


def replace(final, text: str, killed_before: str = "no step") -> subprocess.CompletedProcess:
    """Write `text` as `final` in another process, which dies (exit code 9) just before the step named."""
    from helpers import ROOT

    return subprocess.run([sys.executable, "-c", REPLACE, killed_before, str(final), text], cwd=ROOT,
                          capture_output=True, text=True)


def version(final) -> str | None:
    """'old' or 'new' if `final` holds one version whole, None if it is missing; fails on a mix."""
    if not final.exists():
        return None
    texts = {final.read_text()} if final.is_file() else {(final / name).read_text() for name in ("a", "b")}
    assert len(texts) == 1 and final.is_file() == (final.suffix == ".txt"), f"{final} mixes versions"
    return texts.pop()


@pytest.mark.parametrize("name", ["folder", "file.txt"])
def test_a_kill_between_any_two_steps_of_a_replacement_leaves_the_old_or_the_new_version(tmp_path, name):
    from transfer.outputs import recover

    for step in STEPS:
        final = tmp_path / step.replace(" ", "_") / name
        final.parent.mkdir()
        assert replace(final, "old").returncode == 0 and version(final) == "old"
        killed = replace(final, "new", killed_before=step)
        assert killed.returncode == 9, killed.stderr
        assert version(final) in ("old", "new", None)
        recover(final)  # what the next start does
        expected = "old" if step in STEPS[:2] else "new"  # complete once marked so: the next start moves it in
        assert version(final) == expected, step
        assert sorted(path.name for path in final.parent.iterdir()) == [name], step  # no leftover


def test_a_replacement_that_is_not_killed_leaves_only_the_new_version(tmp_path):
    final = tmp_path / "out"
    for text in ("old", "new"):
        assert replace(final, text).returncode == 0
        assert version(final) == text and [path.name for path in tmp_path.iterdir()] == ["out"]


# Resuming a checkpoint: a half-replaced one is completed, a damaged or foreign one is discarded with one line.

def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dropout(0.5),
                              keras.layers.Dense(2)])
    model.compile("rmsprop", "sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)  # as after an epoch: the checkpoint holds its state
    return model


def saved_after(checkpoints, epochs: int):
    """Save a checkpoint as the trainer does after `epochs` epochs (with best weights, as training.keep=best)."""
    from transfer.checkpoints import Progress, save

    model = tiny_model()
    history = [{"epoch": epoch, "val_accuracy": 0.5} for epoch in range(1, epochs + 1)]
    save(checkpoints, model, Progress(history=history), model.get_weights())
    return model


@pytest.fixture
def stage(tmp_path):
    from transfer.checkpoints import Checkpoints

    return Checkpoints(tmp_path / "checkpoints" / "train", {"cmd": "test", "deps": {}, "params": {}}, 32)


def resumed_epochs(stage) -> int | None:
    from transfer.checkpoints import resume

    model, progress = resume(stage, workers=1, chief=True)
    assert (model is None) == (progress.epochs_done == 0)
    return progress.epochs_done


def test_resume_continues_a_checkpoint_and_keeps_its_weights(stage, capsys):
    import numpy as np

    from transfer.checkpoints import best_weights, resume

    model = saved_after(stage, 2)
    resumed, progress = resume(stage, workers=1, chief=True)
    assert progress.epochs_done == 2 and "resuming from" in capsys.readouterr().out
    for ours, theirs in zip(resumed.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert len(best_weights(stage)) == len(model.get_weights())


@pytest.mark.parametrize("killed_before", STEPS[1:])
def test_a_save_killed_at_any_step_resumes_the_old_or_the_new_checkpoint(stage, killed_before):
    from transfer import outputs

    class Killed(BaseException):
        pass

    def kill(step):
        if step == killed_before:
            raise Killed

    saved_after(stage, 1)
    outputs._before_step = kill
    try:
        with pytest.raises(Killed):
            saved_after(stage, 2)
    finally:
        outputs._before_step = None
    # From "mark the new version complete" on, the folder of epoch 2 is complete: it must never be deleted.
    assert resumed_epochs(stage) == (1 if killed_before == STEPS[1] else 2)
    assert sorted(path.name for path in stage.folder.iterdir()) == ["latest"]


DAMAGES = {
    "state.json": lambda path: path.write_text('{"identity": '),
    "state.json history": lambda path: path.write_text(path.read_text().replace('"epoch": 2', '"epoch": 7')),
    "model.keras": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "model.keras weights": lambda path: path.write_bytes(b"PK\x03\x04" + b"\0" * 100),
    "best_weights.npz": lambda path: path.write_bytes(path.read_bytes()[:200]),
    "best_weights.npz gone": lambda path: path.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_discarded_with_one_line_and_training_restarts(stage, capsys, damage):
    saved_after(stage, 2)
    file = stage.latest / damage.split()[0]
    DAMAGES[damage](file)
    capsys.readouterr()
    assert resumed_epochs(stage) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"discarding checkpoint in {stage.folder}: {file} is damaged (")
    assert lines[0].endswith("); training restarts from epoch 1")
    if damage.startswith("model.keras"):  # the reason is Keras' own error, by its type and first line
        assert f"{file} is damaged (ValueError: " in lines[0], lines[0]
    assert not stage.folder.exists()


def test_a_checkpoint_of_another_global_batch_is_discarded_with_one_line(stage, capsys):
    from dataclasses import replace

    saved_after(stage, 2)  # global batch 32: say one replica of 32
    capsys.readouterr()
    assert resumed_epochs(replace(stage, global_batch=64)) == 0  # two replicas of 32 now
    assert capsys.readouterr().out == (f"discarding checkpoint in {stage.folder}: it was trained with a global batch "
                                       "of 32, this run's is 64 (another number of replicas); training restarts "
                                       "from epoch 1\n")


def test_a_full_disk_while_saving_is_one_line_naming_the_folder_and_keeps_the_last_checkpoint(stage):
    import resource

    from transfer.errors import PipelineError

    saved_after(stage, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # a real refusal by the kernel: EFBIG, as ENOSPC
    try:
        with pytest.raises(PipelineError) as refused:
            saved_after(stage, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(refused.value).startswith(f"no room to write {stage.latest}: File too large (")
    assert "\n" not in str(refused.value)
    assert sorted(path.name for path in stage.folder.iterdir()) == ["latest"]
    assert resumed_epochs(stage) == 1


def test_a_weights_file_counts_by_content_for_dvc_and_the_checkpoint(tmp_path, finished_project, monkeypatch):
    """model.weights names a file under weights/, a dependency of pretrain: new content in the same file makes
    `dvc status` report pretrain changed (so `dvc repro` reruns it) and changes the checkpoint identity."""
    import keras
    from helpers import copy_project, run, set_params

    from transfer.models import build_base

    # A copy of a project that ran: its data stages stay up to date, pretrain reruns with the weights file.
    project = copy_project(finished_project.project, tmp_path / "p")
    set_params(project / "params.yaml", {"model.weights": "weights/cnn.weights.h5", "pretrain.epochs": 1})
    weights = project / "weights/cnn.weights.h5"

    def write_weights(seed: int) -> None:
        keras.utils.set_random_seed(seed)
        build_base("small_cnn", 32, "none").save_weights(weights)

    write_weights(0)
    run(["dvc", "repro", "pretrain"], project)
    assert "up to date" in run(["dvc", "status", "pretrain"], project).stdout
    monkeypatch.chdir(project)
    before = stage_identity("pretrain")
    write_weights(1)  # the same name, other weights
    status = run(["dvc", "status", "pretrain"], project).stdout
    assert "changed deps" in status and "modified:           weights" in status, status
    assert changes(before, stage_identity("pretrain")) == ["weights"]


# In-process checks of the rest of the checkpoint's public behaviour (mutation testing sees only these).

def test_kept_epoch_is_the_last_or_the_best_the_later_on_ties():
    from transfer.checkpoints import Progress

    progress = Progress(history=[{"val_accuracy": a} for a in (0.2, 0.5, 0.4, 0.5, 0.1)])
    assert progress.epochs_done == 5
    assert (progress.kept_epoch("last"), progress.kept_epoch("best")) == (5, 4)
    assert Progress().kept_epoch("best") == 0 and Progress().epochs_done == 0
    assert (Progress().seconds, Progress().images_seen, Progress().history) == (0.0, 0, [])


def test_a_missing_dependency_or_stage_is_one_line(project):
    (project / "code.py").unlink()
    with pytest.raises(PipelineError) as error:
        stage_identity("train")
    assert str(error.value) == "code.py not found: it is a dependency of the train stage (dvc repro)"
    with pytest.raises(PipelineError) as error:
        stage_identity("other", project / "missing.yaml")
    assert str(error.value) == (f"{project / 'missing.yaml'} has no stage 'other' (FileNotFoundError): run from the "
                                "project root")
    (project / "empty.yaml").write_text("")
    with pytest.raises(PipelineError, match=r"has no stage 'train' \(TypeError\)"):
        stage_identity("train", project / "empty.yaml")


def test_a_param_under_a_list_or_missing_is_none_and_a_new_one_counts(project):
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["train"]["params"] += ["seed.x", "nothing.here", "strategies.1.layers"]
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec))
    params = stage_identity("train")["params"]
    assert (params["params.yaml:seed.x"], params["params.yaml:nothing.here"]) == (None, None)
    assert params["params.yaml:strategies.1.layers"] == 0
    assert changes({"cmd": "a"}, {"cmd": "b", "deps": {"x": "1"}, "params": {"params.yaml:k": 1}}) == ["cmd", "x", "k"]


def test_content_hashes_are_sha256_of_a_file_or_of_a_folders_names_and_contents(project):
    import hashlib

    from transfer.checkpoints import content_hash

    assert content_hash(project / "code.py") == hashlib.sha256(b"x = 1\n").hexdigest()
    inner = hashlib.sha256(b"a").hexdigest()
    assert content_hash(project / "data") == hashlib.sha256(f"part/a.bin\0{inner}\0".encode()).hexdigest()


def test_for_stage_and_finish_use_checkpoints_of_the_stage(project):
    from transfer.checkpoints import finish, for_stage

    checkpoints = for_stage("train", 64)
    assert checkpoints.folder.as_posix() == "checkpoints/train" and checkpoints.global_batch == 64
    assert checkpoints.latest.as_posix() == "checkpoints/train/latest"
    assert checkpoints.identity == stage_identity("train")
    (project / "checkpoints" / "train" / "latest").mkdir(parents=True)
    (project / "checkpoints" / "other").mkdir()
    finish("train")
    assert [path.name for path in (project / "checkpoints").iterdir()] == ["other"]


def test_several_workers_never_resume_and_only_the_chief_deletes(stage):
    from transfer.checkpoints import resume

    saved_after(stage, 2)
    model, progress = resume(stage, workers=2, chief=False)
    assert model is None and progress.epochs_done == 0 and stage.latest.exists()
    model, progress = resume(stage, workers=2, chief=True)
    assert model is None and progress.epochs_done == 0 and not stage.folder.exists()


def test_a_checkpoint_of_another_identity_names_what_changed(stage, capsys):
    from dataclasses import replace

    saved_after(stage, 1)
    capsys.readouterr()
    changed = {"cmd": "other", "deps": {"a": "1", "b": "2"}, "params": {"params.yaml:seed": 1, "x.yaml:lr": 2}}
    assert resumed_epochs(replace(stage, identity=changed)) == 0
    assert capsys.readouterr().out == (f"discarding checkpoint in {stage.folder}: cmd, a, b and 2 more changed since "
                                       "it was written; training restarts from epoch 1\n")
    saved_after(stage, 1)
    capsys.readouterr()
    assert resumed_epochs(replace(stage, identity={**stage.identity, "cmd": "x"})) == 0
    assert f"{stage.folder}: cmd changed since it was written;" in capsys.readouterr().out
    for deps, shown in (({"a": "1", "b": "2"}, "cmd, a, b changed"), ({"a": "1", "b": "2", "c": "3"},
                                                                     "cmd, a, b and 1 more changed")):
        saved_after(stage, 1)
        capsys.readouterr()
        assert resumed_epochs(replace(stage, identity={**stage.identity, "cmd": "x", "deps": deps})) == 0
        assert f"{stage.folder}: {shown} since it was written;" in capsys.readouterr().out


def test_no_checkpoint_resumes_nothing_and_without_best_weights_there_are_none(stage, capsys):
    from transfer.checkpoints import Progress, best_weights, resume, save

    assert resume(stage, workers=1, chief=True)[0] is None and capsys.readouterr().out == ""
    model = tiny_model()
    save(stage, model, Progress(history=[{"epoch": 1, "val_accuracy": 0.5}], seconds=2.5, images_seen=7))
    assert best_weights(stage) is None
    resumed, progress = resume(stage, workers=1, chief=True)
    assert (progress.seconds, progress.images_seen) == (2.5, 7)
    assert capsys.readouterr().out == f"resuming from {stage.folder} after epoch 1\n"


def test_a_resumed_model_draws_the_same_dropout_masks(stage):
    import numpy as np

    from transfer.checkpoints import resume

    model = saved_after(stage, 1)
    resumed, _ = resume(stage, workers=1, chief=True)
    x = np.ones((4, 4), np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(resumed(x, training=True).numpy(), model(x, training=True).numpy())


def test_best_weights_that_do_not_fit_the_model_are_damaged(stage, capsys):
    import numpy as np

    saved_after(stage, 2)
    np.savez(stage.latest / "best_weights.npz", np.zeros(3))
    capsys.readouterr()
    assert resumed_epochs(stage) == 0
    assert capsys.readouterr().out == (f"discarding checkpoint in {stage.folder}: {stage.latest / 'best_weights.npz'} "
                                       "is damaged (ValueError: its weights do not fit the model); training restarts "
                                       "from epoch 1\n")


def test_a_stage_without_params_or_deps_has_an_identity_of_its_command_alone(project):
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"bare": {"cmd": "python -m stages.bare"}}}))
    assert stage_identity("bare") == {"cmd": "python -m stages.bare", "deps": {}, "params": {}}


def test_a_history_without_val_accuracy_is_a_damaged_state(stage, capsys):
    import json

    saved_after(stage, 2)
    state = json.loads((stage.latest / "state.json").read_text())
    del state["history"][1]["val_accuracy"]  # kept_epoch("best") could not choose between the epochs
    (stage.latest / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert resumed_epochs(stage) == 0
    assert capsys.readouterr().out == (f"discarding checkpoint in {stage.folder}: {stage.latest / 'state.json'} "
                                       "is damaged (KeyError: 'val_accuracy'); training restarts from epoch 1\n")


def test_a_random_state_of_other_layers_is_a_damaged_checkpoint(stage, capsys):
    """The model's Dropout seed state and state.json's must pair one to one: a model with another count of
    random layers than the state describes is not the model that was checkpointed."""
    import json

    saved_after(stage, 2)
    state = json.loads((stage.latest / "state.json").read_text())
    state["random_state"].append(state["random_state"][0])
    (stage.latest / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert resumed_epochs(stage) == 0
    line = capsys.readouterr().out
    assert line == (f"discarding checkpoint in {stage.folder}: {stage.latest / 'state.json'} is damaged (its "
                    "random_state does not fit the model: ValueError: zip() argument 2 is longer than argument 1); "
                    "training restarts from epoch 1\n")


def test_an_error_without_a_message_is_named_by_its_type():
    from transfer.checkpoints import _first_line

    assert _first_line(ValueError()) == "ValueError"
    assert _first_line(OSError("disk\nsecond line")) == "OSError: disk"


def test_state_json_keeps_the_dropout_seed_state_and_no_weights(stage):
    """Keras saves the weights in model.keras; state.json adds only what it leaves out: the seed state."""
    import json

    model = saved_after(stage, 1)
    seeds = [variable for variable in model.variables if "seed_generator" in variable.path]
    state = json.loads((stage.latest / "state.json").read_text())
    assert state["random_state"] == [seed.numpy().tolist() for seed in seeds] and len(seeds) == 1
