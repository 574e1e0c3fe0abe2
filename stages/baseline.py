"""Stage: the no-transfer baseline, strategy 0 whatever `strategy` says.

The same network and finetune settings as the finetune stage, trained on the
target task from random weights. It reads strategies.0 and not `strategy`, so
`dvc exp run -S strategy=2` does not rerun it; finetune reports its gain over
this stage's test accuracy.
"""

from __future__ import annotations

import time

from transfer import checkpoints, strategies
from transfer.config import load_params
from transfer.errors import run_stage
from transfer.outputs import write_json
from transfer.paths import history_file, metrics_file
from transfer.reports import metrics_report, write_history
from transfer.runtime import set_up
from transfer.training import Run, open_task, train_classifier

STAGE = "baseline"


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    strategy = strategies.baseline(params)
    runtime = set_up(params.training, params.finetune.seed)  # first: a multi-worker distribution must exist
    run = Run(stage=STAGE, init="none", strategy=strategy,
              settings=strategies.settings(params.finetune, strategy), seed=params.finetune.seed,
              labels_per_class=params.data.target_labels_per_class, cache_features=params.finetune.cache_features)
    result = train_classifier(run, open_task("target"), params, runtime)
    if not runtime.chief:
        return
    write_history(history_file(STAGE), result.progress.history)
    write_json(metrics_file(STAGE), metrics_report(result, strategies.BASELINE, runtime, time.perf_counter() - started))
    checkpoints.finish(STAGE)
    print(f"{STAGE}: from scratch, target test accuracy {result.evaluation['test']['accuracy']:.4f} "
          f"-> {metrics_file(STAGE)}")


if __name__ == "__main__":
    run_stage(main)
