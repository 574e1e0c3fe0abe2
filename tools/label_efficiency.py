"""When does transfer pay off? Sweep labels per class x strategy x seed as DVC experiments.

    python -m tools.label_efficiency --run $(cat profiles/cpu.args)   # queue, run and collect
    python -m tools.label_efficiency                                   # collect what `dvc exp show` has

The sweep queues one DVC experiment per (strategy, data.target_labels_per_class,
finetune.seed) with `dvc exp run --queue` and runs the queue. Each experiment
reuses the cached pretrain and reruns baseline and finetune: the baseline stage
trains the same network from scratch (strategy 0) on the same labelled subset.
Then every finished experiment from `dvc exp show --json` into metrics/label_efficiency.csv and a
plot of target test accuracy against labels per class, one line per strategy.
Extra arguments (such as the CPU profile's -S overrides) go to `dvc exp run`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from tools.dvc import dvc, queue_workers_running
from transfer.config import Strategy, describe
from transfer.errors import PipelineError, run_stage
from transfer.outputs import atomic_output, write_text
from transfer.paths import LABEL_EFFICIENCY_PLOT, LABEL_EFFICIENCY_TABLE, metrics_file
from transfer.strategies import describe as describe_strategy

ALL = "null"  # every labelled image
# Keys of `dvc exp show --json`'s metrics: the files as dvc.yaml names them.
FINETUNE_METRICS, BASELINE_METRICS = metrics_file("finetune").as_posix(), metrics_file("baseline").as_posix()


def queue(labels: list[str], strategies: list[str], seeds: list[str], extra: list[str]) -> None:
    """Queue the grid; DVC expands comma-separated -S values into every combination."""
    dvc("exp", "run", "--queue", *extra,
        "-S", f"data.target_labels_per_class={','.join(labels)}",
        "-S", f"strategy={','.join(strategies)}",
        "-S", f"finetune.seed={','.join(seeds)}")


def run_queue(jobs: int, poll_seconds: float = 2.0) -> None:
    """Start the queue workers and wait until they leave (they do once the queue is empty)."""
    dvc("queue", "start", "--jobs", str(jobs))
    while queue_workers_running(Path(".")):
        time.sleep(poll_seconds)
    failed = [line for line in dvc("queue", "status").splitlines() if "Failed" in line]
    if failed:
        print(f"label_efficiency: {len(failed)} experiment(s) failed; see `dvc queue logs <name>`")


def experiments(shown: list[dict]) -> Iterator[dict]:
    """Every experiment (not the workspace or baseline rows) in `dvc exp show --json` output."""
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            yield from experiment.get("revs", [])


def strategy_name(params: dict, number: int) -> str:
    """Strategy `number` in words, as the experiment's own params.yaml defines it (profiles redefine some)."""
    entry = params["strategies"][str(number)]  # JSON keys are strings
    return describe_strategy(number, Strategy.model_validate(entry), params["model"]["backbone"])


def collect(shown: list[dict]) -> pd.DataFrame:
    """One row per (strategy, labels per class, seed): finetune's strategy, and the from-scratch
    baseline that every experiment trains beside it on the same labelled subset."""
    rows = []
    for experiment in experiments(shown):
        data = experiment.get("data") or {}
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {})
        if not params:
            continue
        for file, strategy in ((FINETUNE_METRICS, params["strategy"]), (BASELINE_METRICS, 0)):
            result = metrics.get(file, {}).get("data")
            if not result or "test" not in result:
                continue
            try:
                name = strategy_name(params, strategy)
            except ValueError as error:  # e.g. a layer count beyond the base, run before counts were checked
                reason = describe(error) if isinstance(error, ValidationError) else str(error)
                print(f"label_efficiency: left out {experiment.get('name') or experiment.get('rev')}, "
                      f"its strategies.{strategy} is invalid ({reason})")
                continue
            rows.append({
                "strategy": strategy,
                "strategy_name": name,
                "labels_per_class": params["data"]["target_labels_per_class"] or "all",
                "seed": params["finetune"]["seed"],
                "images_per_class": result["train_images"] // len(params["data"]["target_classes"]),
                "test_accuracy": result["test"]["accuracy"],
                "test_macro_f1": result["test"].get("macro_f1"),
                "timestamp": data.get("timestamp") or "",
            })
    if not rows:
        raise PipelineError(f"no finished experiments with {FINETUNE_METRICS} in `dvc exp show`; run the sweep first")
    table = pd.DataFrame(rows).sort_values("timestamp")
    # A point run twice (or a baseline seen by several experiments) keeps its latest result;
    # one number defined two ways (say, by another profile) stays two strategies.
    table = table.drop_duplicates(["strategy", "strategy_name", "labels_per_class", "seed"], keep="last")
    table = table.drop(columns="timestamp")
    return table.sort_values(["strategy", "images_per_class", "seed"]).reset_index(drop=True)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (_, name), group in table.groupby(["strategy", "strategy_name"]):
        summary = group.groupby("images_per_class")["test_accuracy"].agg(["mean", "std", "count"]).fillna(0)
        x = summary.index.to_numpy()
        axes.plot(x, 100 * summary["mean"], marker="o",
                  label=f"{name} ({int(summary['count'].max())} seeds)")
        axes.fill_between(x, 100 * (summary["mean"] - summary["std"]), 100 * (summary["mean"] + summary["std"]),
                          alpha=0.2)
    axes.set_xscale("log")
    axes.set_xlabel("labelled target images per class (log scale)")
    axes.set_ylabel("target test accuracy (%)")
    axes.set_title("When does transfer pay off? (mean ± std over seeds)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="queue and run the sweep before collecting")
    parser.add_argument("--labels", default="10,50,250,1000,null", help="labels per class (null = all)")
    parser.add_argument("--strategies", default="1", help="strategies to sweep; baseline adds 0")
    parser.add_argument("--seeds", default="1,2,3", help="finetune.seed values")
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at once")
    args, extra = parser.parse_known_args()
    if args.run:
        # Queued experiments start from the workspace: bring its pipeline up to date with the same
        # overrides first, so that every experiment finds pretrain done in the cache and reruns finetune alone.
        dvc("exp", "run", *extra)
        queue(args.labels.split(","), args.strategies.split(","), args.seeds.split(","), extra)
        run_queue(args.jobs)
    table = collect(json.loads(dvc("exp", "show", "--json")))
    # Just the requested grid: not the run that prepared the workspace, nor other experiments.
    labels = {"all" if value == ALL else int(value) for value in args.labels.split(",")}
    table = table[table["seed"].isin([int(seed) for seed in args.seeds.split(",")])
                  & table["labels_per_class"].isin(labels)].reset_index(drop=True)
    write_text(LABEL_EFFICIENCY_TABLE, table.to_csv(index=False))
    plot(table, LABEL_EFFICIENCY_PLOT)
    summary = table.groupby(["strategy_name", "images_per_class"])["test_accuracy"].agg(["mean", "std", "count"])
    print(summary.round(4).to_string())
    print(f"label_efficiency: {len(table)} runs -> {LABEL_EFFICIENCY_TABLE}, {LABEL_EFFICIENCY_PLOT}")


if __name__ == "__main__":
    run_stage(main)
