"""The fine-tuned model as a product: `cifar10-transfer predict`, the export stage (SavedModel, TFLite, model
card) and the model registry, over one tiny project that ran `dvc repro` with JPEG-stored records."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from helpers import ROOT, copy_project, run

from transfer.cli import main
from transfer.images import Storage, prepare
from transfer.models import read_description
from transfer.records import dataset, open_split
from transfer.strategies import describe

MODEL = "cifar10-target-classifier"
SERVING = "cifar10-target-classifier-serving"


@pytest.fixture(scope="module")
def project(tmp_path_factory, finished_project) -> Path:
    """A copy of the tiny project after `dvc repro` (conftest.finished_project: JPEG-stored records, a head that
    learned), committed, its outputs pushed to a local remote."""
    folder = tmp_path_factory.mktemp("product")
    project = copy_project(finished_project.project, folder / "p")
    run(["dvc", "remote", "add", "-d", "storage", str(folder / "remote")], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)
    run(["dvc", "push", "-q"], project)
    return project


@pytest.fixture(scope="module")
def test_pngs(project, tmp_path_factory) -> list[Path]:
    """The target test images, as the split stage took them from the archive, one PNG each, in the
    predictions CSV's order (the records' order: one shard, so index order)."""
    assert len(open_split(project / "data/tfrecords", "target", "test").files) == 1
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for index, image in enumerate(np.load(project / "data/split/target/test_images.npy")):
        paths.append(folder / f"{index:05d}.png")
        paths[-1].write_bytes(tf.io.encode_png(image).numpy())
    return paths


def predicted_in_csv(project: Path) -> list[str]:
    return [row.split(",")[1] for row in (project / "metrics/finetune_predictions.csv").read_text().splitlines()[1:]]


def test_the_console_script_is_the_cli():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["cifar10-transfer"].split(":")
    assert getattr(import_module(module), function) is main


def test_prepare_makes_an_original_image_its_stored_record_bit_for_bit(project, test_pngs):
    split = open_split(project / "data/tfrecords", "target", "test")
    assert split.encoding == "jpeg"
    stored = np.concatenate([images.numpy() for images, _ in dataset(split, 8)])
    storage = read_description(project / "models/finetuned.keras").storage
    prepared = np.stack([prepare(tf.constant(path.read_bytes()), storage).numpy() for path in test_pngs])
    assert np.array_equal(prepared, stored)
    # Without the JPEG round trip the images differ: the test above would notice a predict that skipped it.
    raw = np.stack([prepare(tf.constant(path.read_bytes()), Storage(32, "raw", 95)).numpy()
                    for path in test_pngs])
    assert not np.array_equal(raw, stored)


def test_predict_agrees_with_the_measured_predictions(project, test_pngs):
    result = run([sys.executable, "-m", "transfer.cli", "predict", str(test_pngs[0].parent), "--json"], project)
    answers = json.loads(result.stdout)
    assert [answer["path"] for answer in answers] == [str(path) for path in test_pngs]
    expected = predicted_in_csv(project)
    agree = sum(answer["class"] == want for answer, want in zip(answers, expected))
    assert len(answers) == len(expected) == 20 and agree / len(expected) >= 0.999
    for answer in answers:
        assert list(answer["probabilities"]) == ["dog", "frog", "horse", "ship", "truck"]
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert answer["probability"] == max(answer["probabilities"].values())


def test_predict_prints_class_probability_and_path(project, test_pngs, capsys, monkeypatch):
    monkeypatch.chdir(project)  # the default model is the workspace's models/finetuned.keras
    main(["predict", str(test_pngs[3])])
    label, probability, path = capsys.readouterr().out.rstrip("\n").split("\t")
    assert label == predicted_in_csv(project)[3] and 0.2 < float(probability) <= 1 and path == str(test_pngs[3])


@pytest.mark.parametrize("case", ["missing file", "not an image", "damaged image", "empty folder",
                                  "unreadable model", "model without description"])
def test_predict_errors_are_one_line_naming_the_file(case, project, test_pngs, tmp_path, capsys):
    model, image = project / "models/finetuned.keras", test_pngs[0]
    if case == "missing file":
        image, named = tmp_path / "nothing.png", tmp_path / "nothing.png"
    elif case == "not an image":
        image = named = tmp_path / "notes.png"
        named.write_text("not a picture")
    elif case == "damaged image":
        image = named = tmp_path / "cut.png"
        named.write_bytes(test_pngs[0].read_bytes()[:40])
    elif case == "empty folder":
        image = named = tmp_path
    elif case == "unreadable model":
        model = named = tmp_path / "broken.keras"
        named.write_bytes(b"PK\x03\x04 truncated")
    else:  # a plain Keras file, saved without the classes and image format
        import keras

        model = named = tmp_path / "plain.keras"
        keras.models.load_model(project / "models/finetuned.keras").save(named)
    with pytest.raises(SystemExit) as raised:
        main(["predict", str(image), "--model", str(model)])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(named) in err[0], err
    if case == "damaged image":  # TensorFlow's reason, without its op's names
        reason = "Invalid PNG. Failed to initialize decoder."
        assert err[0] == f"error: {named}: not a readable PNG or JPEG image ({reason})"


SERVE_WITHOUT_PROJECT = """
import json, sys
from pathlib import Path
import tensorflow as tf
export, images = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
serve = tf.saved_model.load(str(export / "saved_model")).signatures["serving_default"]
files = {suffix: [p.read_bytes() for p in images if p.suffix == "." + suffix] for suffix in ("png", "jpg")}
answers = {name: serve(images=tf.constant(data)) for name, data in files.items()}
print(json.dumps({
    "predicted": {name: [c.decode() for c in out["predicted_class"].numpy()] for name, out in answers.items()},
    "classes": [[c.decode() for c in row] for row in answers["png"]["classes"].numpy()],
    "probabilities": {name: out["probabilities"].numpy().tolist() for name, out in answers.items()},
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("transfer", "stages", "tools")),
}))
"""


def test_the_saved_model_serves_png_and_jpeg_bytes_without_this_project(project, test_pngs, tmp_path):
    """A fresh Python that imports TensorFlow only, outside the project, with no PYTHONPATH. It answers for a JPEG
    file as `cifar10-transfer predict` does, and for the JPEG of an image about as for its PNG."""
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for path in test_pngs:  # what a camera or a browser uploads: lossy JPEG files, quality 90
        image = tf.io.decode_png(path.read_bytes())
        (jpegs / f"{path.stem}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
    jpeg_files = sorted(jpegs.iterdir())
    result = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_PROJECT, str(project / "models/export"),
                             *map(str, test_pngs + jpeg_files)], cwd=tmp_path, env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout.splitlines()[-1])
    assert served["project_modules"] == []
    classes = ["dog", "frog", "horse", "ship", "truck"]
    assert served["classes"] == [classes] * len(test_pngs)
    actual = [row.split(",")[0] for row in (project / "metrics/finetune_predictions.csv").read_text().splitlines()[1:]]
    accuracy = np.mean([p == a for p, a in zip(served["predicted"]["png"], actual)])
    measured = json.loads((project / "metrics/finetune.json").read_text())["test"]["accuracy"]
    assert abs(accuracy - measured) <= 0.001  # within 0.1 points of finetune's test accuracy
    assert served["predicted"]["png"] == [classes[int(np.argmax(row))] for row in served["probabilities"]["png"]]
    # The JPEG files, served and through the documented path (`predict`: images.prepare, then the Keras model).
    answers = json.loads(run([sys.executable, "-m", "transfer.cli", "predict", str(jpegs), "--json"], project).stdout)
    assert [answer["path"] for answer in answers] == list(map(str, jpeg_files))
    assert served["predicted"]["jpg"] == [answer["class"] for answer in answers]
    # The same float32 network on the same prepared pixels: only the order of float operations may differ (5e-7
    # here). A serving graph that prepared images otherwise (a JPEG round trip at 75, not 95) differed by 0.015.
    np.testing.assert_allclose(served["probabilities"]["jpg"],
                               [list(answer["probabilities"].values()) for answer in answers], atol=1e-5)
    # A JPEG of an image is that image to the model, up to the loss of quality 90 (all 20 classes the same here,
    # probabilities within 0.013): a JPEG decoded wrong (another channel order, another colour space) moves the
    # colours the tiny archive's classes are told by (with red and blue swapped: no class the same, 0.68 apart).
    agree = np.mean([j == p for j, p in zip(served["predicted"]["jpg"], served["predicted"]["png"])])
    assert agree >= 0.9, served["predicted"]
    np.testing.assert_allclose(served["probabilities"]["jpg"], served["probabilities"]["png"], atol=0.05)


def test_tflite_agrees_with_the_saved_model(project, test_pngs):
    export = project / "models/export"
    storage = read_description(project / "models/finetuned.keras").storage
    pixels = np.stack([prepare(tf.constant(path.read_bytes()), storage).numpy() for path in test_pngs[:100]])
    saved = tf.saved_model.load(str(export / "saved_model")).signatures["pixels"]
    expected = saved(pixels=tf.constant(pixels))["probabilities"].numpy()
    with warnings.catch_warnings():  # tf.lite.Interpreter is deprecated in favour of ai_edge_litert, still in TF 2.21
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(export / "model.tflite"))
    got = interpreter.get_signature_runner("pixels")(pixels=pixels)["probabilities"]
    assert got.shape == expected.shape == (len(pixels), 5)
    assert np.mean(got.argmax(axis=1) == expected.argmax(axis=1)) >= 0.99
    assert (export / "labels.txt").read_text().split() == ["dog", "frog", "horse", "ship", "truck"]


def test_the_registry_finds_both_artifacts_from_a_clone(project, tmp_path, capsys, monkeypatch):
    for name in (MODEL, SERVING):  # what `gto register <name>` does: an annotated version tag
        run(["git", "tag", "-a", f"{name}@v1.0.0", "-m", f"Registering artifact {name} version v1.0.0"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    # In a subprocess: dvc sets up logging to the streams it finds, which pytest's capture later closes.
    show = f"import dvc.api, json; print(json.dumps(dvc.api.artifacts_show({MODEL!r}, repo={str(clone)!r})))"
    shown = json.loads(run([sys.executable, "-c", show], tmp_path).stdout)
    assert shown == {"rev": head, "path": "models/finetuned.keras"}
    run(["dvc", "artifacts", "get", str(clone), MODEL, "-o", "model.keras"], tmp_path)
    run(["dvc", "artifacts", "get", str(clone), SERVING, "-o", "export"], tmp_path)
    assert (tmp_path / "model.keras").read_bytes() == (project / "models/finetuned.keras").read_bytes()
    assert {path.name for path in (tmp_path / "export").iterdir()} == {
        "saved_model", "model.tflite", "labels.txt", "MODEL_CARD.md"}
    # The downloaded model is enough to predict: it carries its classes and image format.
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "one.png"
    image.write_bytes(tf.io.encode_png(np.load(project / "data/split/target/test_images.npy")[0]).numpy())
    main(["predict", "--model", "model.keras", str(image)])
    assert capsys.readouterr().out.split("\t")[0] == predicted_in_csv(project)[0]


def split_front_matter(card: str) -> tuple[dict, str]:
    """The YAML block between the opening `---` lines, parsed, and the Markdown after its blank line."""
    opening, front, body = card.split("---\n", 2)
    assert opening == "", "the card must open with its metadata block"
    assert body.startswith("\n"), "a blank line separates the metadata from the Markdown"
    return yaml.safe_load(front), body[1:]


def test_the_model_card_says_what_the_metrics_and_params_say(project):
    card = (project / "models/export/MODEL_CARD.md").read_text()
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    baseline = json.loads((project / "metrics/baseline.json").read_text())
    pretrain = json.loads((project / "metrics/pretrain.json").read_text())
    from transfer.config import load_params

    params = load_params(project / "params.yaml")
    test = finetune["test"]
    front, body = split_front_matter(card)
    assert body.startswith("# Model card: CIFAR-10 classifier for dog, frog, horse, ship, truck\n")
    # Hugging Face's model card metadata, parsed back as a hub would
    assert front["library_name"] == "keras" and front["datasets"] == ["cifar10"]
    assert front["pipeline_tag"] == "image-classification" and front["license"] == params.export.license
    (result,) = front["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["type"] == "cifar10"
    assert result["dataset"]["split"] == "test"
    assert result["metrics"] == [{"type": "accuracy", "value": round(test["accuracy"], 6), "name": "Test accuracy"}]
    expected_lines = [
        "from the first of params.yaml's `data.sources` that was there (`metrics/download.json` names it",
        "`small_cnn` (initial weights: none), pretrained on the other CIFAR-10 classes "
        f"(airplane, automobile, bird, cat, deer) to {pretrain['test']['accuracy']:.2%} source test accuracy",
        f"**Fine-tuning strategy**: {describe(1, params.chosen_strategy(), 'small_cnn')}; "
        f"{finetune['trainable_params']:,} of {finetune['total_params']:,} parameters trained",
        "resized to 32x32 (bilinear), stored as JPEG at quality 95",
        f"{finetune['train_images']:,} training images",
        f"Accuracy **{test['accuracy']:.2%}**, macro F1 {test['macro_f1']:.4f}",
        f"**{100 * finetune['gain_over_scratch']:+.2f} points**",
        f"from random weights on the same images: {baseline['test']['accuracy']:.2%}",
        "## Test results (20 images)",
        "Trained on 32x32 CIFAR-10 images:",
        "there is no \"none of these\"",
    ]
    for expected in expected_lines:
        assert expected in card, expected
    kept = finetune.get("kept_epoch")
    assert (f"**Kept model**: epoch {kept} of {finetune['epochs']}" if kept is not None
            else f"**Kept model**: the last of {finetune['epochs']} epochs") in card
    for name, scores in test["per_class"].items():
        assert f"| {name} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} |" in card
