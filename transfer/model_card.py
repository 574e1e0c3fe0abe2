"""The model card: a short Markdown page on what the fine-tuned model is and is not good for.

Every number comes from the pipeline's metrics and params (the export stage passes them in), none by hand.
It opens with the YAML metadata block that model hubs read (Hugging Face's model card spec:
huggingface.co/docs/hub/model-cards), so the card can be a model repository's README.md as it is.
"""

from __future__ import annotations

import yaml

from transfer.config import Params
from transfer.models import Description
from transfer.strategies import describe

CARD_FILE = "MODEL_CARD.md"


def model_card(description: Description, params: Params, finetune: dict, baseline: dict, pretrain: dict,
               test_images: int) -> str:
    """The card's Markdown, from finetune.json, baseline.json, pretrain.json and params.yaml."""
    classes = description.classes
    storage = description.storage
    size = storage.image_size
    test = finetune["test"]
    backbone = params.model.backbone
    stored = "raw pixels" if storage.encoding == "raw" else f"JPEG at quality {storage.jpeg_quality}"
    epochs = finetune["epochs"]
    kept = finetune.get("kept_epoch")  # written since the kept-epoch choice (training.keep); older runs kept the last
    keep = finetune.get("keep", "last")
    kept_text = f"epoch {kept} of {epochs} (keep: {keep})" if kept is not None else f"the last of {epochs} epochs"
    if (head_epochs := params.chosen_strategy().head_epochs) and kept is not None:  # a warm head: which phase
        kept_text += f", in phase {1 if kept <= head_epochs else 2} ({head_epochs} epochs of the head alone, then " \
                     f"{epochs - head_epochs} of the strategy's layers)"
    source = ", ".join(pretrain["test"]["per_class"])
    lines = [
        metadata(f"cifar10-{backbone}-{'-'.join(classes)}", classes, params.export.license, test["accuracy"]),
        "",
        f"# Model card: CIFAR-10 classifier for {', '.join(classes)}",
        "",
        "Written by the export stage from metrics/*.json and params.yaml; rerun `dvc repro` rather than edit it.",
        "",
        "## What it is",
        "",
        f"- **Task**: one of {len(classes)} classes per image: {', '.join(classes)}.",
        f"- **Backbone**: `{backbone}` (initial weights: {params.model.weights}), pretrained on the other "
        f"CIFAR-10 classes ({source}) to {pretrain['test']['accuracy']:.2%} source test accuracy.",
        f"- **Fine-tuning strategy**: {describe(params.strategy, params.chosen_strategy(), backbone)}; "
        f"{finetune['trainable_params']:,} of {finetune['total_params']:,} parameters trained.",
        f"- **Kept model**: {kept_text}.",
        f"- **Input**: RGB images resized to {size}x{size} (bilinear), stored as {stored} before the model "
        "saw them; `cifar10-transfer predict` and the SavedModel do the same to any image.",
        "",
        "## Training data",
        "",
        # Not the source itself: copies of the same images train the same model, and export does not rerun for it.
        "- CIFAR-10's python archive, from the first of params.yaml's `data.sources` that was there "
        "(`metrics/download.json` names it, with its md5).",
        f"- {finetune['train_images']:,} training images of these classes"
        + (f" ({params.data.target_labels_per_class} per class)" if params.data.target_labels_per_class else "")
        + f" (a share of {params.data.val_fraction:g} of CIFAR-10's training images held out to validate); "
        f"tested on {test_images:,} images of CIFAR-10's test set.",
        "",
        f"## Test results ({test_images:,} images)",
        "",
        f"- Accuracy **{test['accuracy']:.2%}**, macro F1 {test['macro_f1']:.4f}.",
        f"- Gain over training from scratch: **{100 * finetune['gain_over_scratch']:+.2f} points** (the same network "
        f"trained from random weights on the same images: {baseline['test']['accuracy']:.2%}).",
        "",
        "| class | precision | recall | F1 |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} |"
          for name, scores in test["per_class"].items()),
        "",
        "## Known limits",
        "",
        "- Trained on 32x32 CIFAR-10 images"
        + (f" upscaled to {size}x{size} px" if size != 32 else "")
        + ": larger photos lose their detail when resized, and photos unlike CIFAR-10's "
        "(centred object, small, low resolution) score below the test accuracy above.",
        "- Images are resized to a square without keeping their aspect ratio, as the training images were.",
        f"- It always answers one of the {len(classes)} classes: there is no \"none of these\", and the "
        "probabilities are not calibrated.",
        "",
        "## Files",
        "",
        "- `saved_model/`: signature `serving_default` takes encoded PNG or JPEG files (a string tensor) and "
        "returns `probabilities`, `classes` and `predicted_class`; `pixels` takes prepared float32 images.",
        f"- `model.tflite`: float32 input of shape (batch, {size}, {size}, 3), pixel values 0-255, prepared as "
        "above by the caller (TFLite cannot decode images); outputs the probabilities in `labels.txt`'s order.",
    ]
    return "\n".join(lines) + "\n"


def metadata(name: str, classes: tuple[str, ...], license_id: str, test_accuracy: float) -> str:
    """The front matter of Hugging Face's model card spec: library, data set, task and the test accuracy."""
    fields = {
        "library_name": "keras",
        "license": license_id,
        "datasets": ["cifar10"],
        "pipeline_tag": "image-classification",
        "tags": ["transfer-learning", "dvc"],
        "model-index": [{
            "name": name,
            "results": [{
                "task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"type": "cifar10", "name": f"CIFAR-10 ({', '.join(classes)})", "split": "test"},
                "metrics": [{"type": "accuracy", "value": round(test_accuracy, 6), "name": "Test accuracy"}],
            }],
        }],
    }
    return f"---\n{yaml.safe_dump(fields, sort_keys=False)}---"
