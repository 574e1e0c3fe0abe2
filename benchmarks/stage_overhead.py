"""What a stage process costs beyond its work: the CPU seconds of each stage on a tiny project, as shipped (the
garbage collector's view frozen after the imports and after main(), transfer/errors.run_stage) and with
`gc.freeze` made a no-op, alternating the two.

A tiny stage is mostly a Python process importing TensorFlow, Keras and matplotlib and exiting: the tests start
about 140 of them, and a user's `dvc exp run` of a changed strategy starts four. The CPU profile's network at
32 px on `--fraction` of every class of the archive.

    python -m benchmarks.stage_overhead [--repeats 3] [--fraction 0.002] [--workdir /tmp/benchmarks]
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys

from benchmarks.common import archive_share, arguments, report, run_stages, workspace

STAGES = ("download", "split", "preprocess", "pretrain", "baseline", "finetune", "figures", "export")
TIMED = ("preprocess", "pretrain", "baseline", "finetune", "figures", "export")
UNFROZEN = "import gc, runpy; gc.freeze = lambda: None; runpy.run_module('stages.{}', run_name='__main__')"


def cpu_seconds(command: list[str]) -> float:
    """User and system CPU seconds of the command, its children included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.002, help="share of every class of the archive")
    args = parser.parse_args()
    args.archive, args.md5 = archive_share(args.archive, args.fraction, args.workdir)
    workspace("stage_overhead", args, {"model.backbone": "small_cnn", "model.weights": "none",
                                       "preprocess.image_size": 32, "preprocess.encoding": "raw",
                                       "preprocess.workers": 1, "pretrain.epochs": 2, "finetune.epochs": 2})
    run_stages(*STAGES)
    seconds: dict[str, dict[str, list[float]]] = {stage: {"frozen": [], "unfrozen": []} for stage in TIMED}
    for _ in range(args.repeats):
        for stage in TIMED:
            seconds[stage]["frozen"].append(cpu_seconds([sys.executable, "-m", f"stages.{stage}"]))
            seconds[stage]["unfrozen"].append(cpu_seconds([sys.executable, "-c", UNFROZEN.format(stage)]))
    medians = {stage: {kind: round(statistics.median(values), 2) for kind, values in runs.items()}
               for stage, runs in seconds.items()}
    for stage, median in medians.items():
        print(f"{stage:10s} frozen {median['frozen']:5.2f} CPU-s, unfrozen {median['unfrozen']:5.2f} CPU-s")
    frozen, unfrozen = (sum(median[kind] for median in medians.values()) for kind in ("frozen", "unfrozen"))
    report({"repeats": args.repeats, "fraction": args.fraction, "median_cpu_seconds": medians,
            "all_stages_frozen": round(frozen, 2), "all_stages_unfrozen": round(unfrozen, 2),
            "frozen_over_unfrozen": round(frozen / unfrozen, 3),
            "runs": {stage: {kind: [round(value, 2) for value in values] for kind, values in runs.items()}
                     for stage, runs in seconds.items()}})


if __name__ == "__main__":
    main()
