"""Stage 4: pretrain backbone + head on the source task.

The whole network trains (BatchNorm in training mode), initialised from
model.weights. A checkpoint after every epoch lets an interrupted run
continue where it stopped (transfer/checkpoints.py); it is discarded when
anything dvc.yaml lists for this stage changed, and deleted once the stage is done.
"""

from __future__ import annotations

import time

from transfer import checkpoints
from transfer.config import load_params
from transfer.errors import run_stage
from transfer.models import build_base, classifier, count_params
from transfer.outputs import write_json
from transfer.paths import METRICS, PRETRAINED_MODEL, RECORDS
from transfer.records import check_shards, dataset, epochs, open_split
from transfer.training import (
    EVAL_BATCH,
    Runtime,
    compile_model,
    evaluate_splits,
    fit,
    global_batch,
    metrics_report,
    save_model,
    set_up,
    write_history,
)

SPLITS = ("train", "val", "test")


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    runtime: Runtime = set_up(params.train, params.seed)
    splits = {name: open_split(RECORDS, "source", name) for name in SPLITS}
    for split in splits.values():
        check_shards(split)
    settings = params.pretrain
    train = splits["train"]
    resumable = checkpoints.for_stage("pretrain")

    with runtime.strategy.scope():
        model, progress = checkpoints.resume(resumable, runtime.workers, runtime.chief)
        if model is None:
            base = build_base(params.model.backbone, train.image_size, params.model.weights)
            model = classifier(base, params.model.backbone, len(train.classes), params.model.head_units,
                               params.model.dropout, base_training=None)
    compile_model(model, settings.learning_rate, params.train, runtime, optimizer=getattr(model, "optimizer", None))

    train_epochs = epochs(train, global_batch(settings.batch_size, runtime), shuffle_buffer=params.train.shuffle_buffer,
                          seed=params.seed)
    fit(model, train_epochs, dataset(splits["val"], EVAL_BATCH), settings.epochs, progress, train.count, runtime,
        resumable)
    if not runtime.chief:
        save_model(model, PRETRAINED_MODEL, runtime)
        print("pretrain: training done; the chief evaluates and writes the outputs")
        return

    evaluation, _, _ = evaluate_splits(
        model, {name: dataset(split, EVAL_BATCH) for name, split in splits.items()}, train.classes
    )
    save_model(model, PRETRAINED_MODEL, runtime)
    write_history(METRICS / "pretrain_history.csv", progress.history)
    write_json(METRICS / "pretrain.json", metrics_report(
        strategy=None, model=model, trainable_params=count_params(model.trainable_weights),
        evaluation=evaluation, progress=progress, stage_seconds=time.perf_counter() - started, runtime=runtime,
    ))
    checkpoints.finish(resumable)
    print(f"pretrain: source test accuracy {evaluation['test']['accuracy']:.4f} -> {PRETRAINED_MODEL}")


if __name__ == "__main__":
    run_stage(main)
