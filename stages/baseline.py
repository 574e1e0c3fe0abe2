"""Stage: the no-transfer baseline, strategy 0 whatever `strategy` says.

The same network and finetune settings as the finetune stage, trained on the
target task from random weights. It reads strategies.0 and not `strategy`, so
`dvc exp run -S strategy=2` does not rerun it; finetune reports its gain over
this stage's test accuracy.
"""

from __future__ import annotations

import time

from stages.finetune import fine_tune, target_splits
from transfer import checkpoints
from transfer.config import load_params
from transfer.errors import PipelineError, run_stage
from transfer.outputs import write_json
from transfer.paths import BASELINE_METRICS, METRICS
from transfer.training import set_up, write_history

BASELINE_STRATEGY = 0


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    chosen = params.strategies.get(BASELINE_STRATEGY)
    if chosen is None or chosen.base_weights != "random":
        raise PipelineError(f"params.yaml: strategies.{BASELINE_STRATEGY} must be the from-scratch baseline "
                            "(base_weights: random)")
    runtime = set_up(params.train, params.finetune.seed)  # first: a multi-worker strategy must exist before TF starts
    resumable = checkpoints.for_stage("baseline")
    outcome = fine_tune(params.model_copy(update={"strategy": BASELINE_STRATEGY}), target_splits(), runtime,
                        resumable)
    if not runtime.chief:
        return
    write_history(METRICS / "baseline_history.csv", outcome.progress.history)
    write_json(BASELINE_METRICS, outcome.report(BASELINE_STRATEGY, time.perf_counter() - started))
    checkpoints.finish(resumable)
    print(f"baseline: from scratch, target test accuracy {outcome.evaluation['test']['accuracy']:.4f} "
          f"-> {BASELINE_METRICS}")


if __name__ == "__main__":
    run_stage(main)
