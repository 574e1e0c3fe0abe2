"""Stage: the no-transfer baseline, strategy 0 whatever `strategy` says.

The same network and finetune settings as the finetune stage, trained on the
target task from random weights. It reads strategies.0 and not `strategy`, so
`dvc exp run -S strategy=2` does not rerun it; finetune reports its gain over
this stage's test accuracy.
"""

from __future__ import annotations

import time

from transfer.config import load_params
from transfer.errors import run_stage
from transfer.paths import metrics_file
from transfer.runtime import set_up
from transfer.strategies import BASELINE
from transfer.training import open_task, train_classifier
from transfer.training_stage import finish, run_for


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    run = run_for("baseline", params)
    runtime = set_up(params.training, run.seed)  # first: a multi-worker distribution must exist
    result = train_classifier(run, open_task("target"), params, runtime)
    if finish(run, result, runtime, started, strategy=BASELINE):
        print(f"baseline: from scratch, target test accuracy {result.evaluation['test']['accuracy']:.4f} "
              f"-> {metrics_file('baseline')}")


if __name__ == "__main__":
    run_stage(main)
