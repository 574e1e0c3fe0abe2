"""Stage: the fine-tuned model as a product: models/export/ with a SavedModel that takes encoded images,
a TFLite file, the class names and a model card (transfer/serving.py, transfer/model_card.py).
"""

from __future__ import annotations

from transfer.config import load_params
from transfer.errors import PipelineError, run_stage
from transfer.model_card import CARD_FILE, model_card
from transfer.models import load_model, read_description
from transfer.outputs import atomic_output
from transfer.paths import EXPORT, FINETUNED_MODEL, PREDICTIONS, metrics_file
from transfer.reports import read_metrics
from transfer.serving import export


def main() -> None:
    params = load_params()
    model = load_model(FINETUNED_MODEL, made_by="finetune")
    description = read_description(FINETUNED_MODEL)
    metrics = {stage: read_metrics(metrics_file(stage), made_by=stage)
               for stage in ("finetune", "baseline", "pretrain")}
    test_images = test_image_count()
    with atomic_output(EXPORT) as folder:
        folder.mkdir()
        export(model, description, folder)
        (folder / CARD_FILE).write_text(model_card(description, params, metrics["finetune"], metrics["baseline"],
                                                   metrics["pretrain"], test_images))
    print(f"export: SavedModel, TFLite and {CARD_FILE} for {', '.join(description.classes)} -> {EXPORT}")


def test_image_count() -> int:
    try:
        return len(PREDICTIONS.read_text().splitlines()) - 1  # a header, then one row per test image
    except FileNotFoundError:
        raise PipelineError(f"{PREDICTIONS} not found: run the finetune stage (dvc repro)") from None


if __name__ == "__main__":
    run_stage(main)
