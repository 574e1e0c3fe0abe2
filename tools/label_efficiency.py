"""When does transfer pay off, and with which strategy? Sweep labels per class x strategy x seed as DVC experiments.

    python -m tools.label_efficiency --run $(cat profiles/cpu.args)   # queue, run and collect a new sweep
    python -m tools.label_efficiency --sweep ID                       # collect sweep ID again

The sweep queues one DVC experiment per (strategy, data.target_labels_per_class,
finetune.seed) with `dvc exp run --queue -n ID-<labels>-<seed>-s<strategy>` and runs the
queue. Every seed runs up to --seeds-up-to labels per class, where the spread over seeds
matters; above it (and with all labels) the first seed alone. Each experiment runs up to the
finetune stage: it reuses the cached pretrain and reruns baseline and finetune (not figures or
export): the baseline stage trains the same network from scratch (strategy 0) on the same
labelled subset, and DVC's run-cache restores it for the next strategy of that (labels, seed).
Then exactly those experiments, by name, go from `dvc exp show --json` into
metrics/label_efficiency.csv (each row with the params it ran with) and a plot of target test
accuracy against labels per class, one line per strategy (dashed: a warm head), and a
Markdown table of mean ± std per strategy and label count, the best in bold, goes to stdout.
A failed or missing point stops the tool before anything is written, unless --skip-failed.
Extra arguments (such as the CPU profile's -S overrides, or strategies params.yaml lacks:
-S '++strategies={4:{trainable_base_layers:2,head_epochs:5}}') go to `dvc exp run`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from tools.dvc import dvc, queue_workers_running
from transfer.config import Finetune, Strategy, describe
from transfer.errors import PipelineError, run_stage
from transfer.outputs import atomic_output, write_text
from transfer.paths import LABEL_EFFICIENCY_PLOT, LABEL_EFFICIENCY_TABLE, metrics_file
from transfer.strategies import BASELINE, settings
from transfer.strategies import describe as describe_strategy

ALL = "null"  # every labelled image
# Keys of `dvc exp show --json`'s metrics: the files as dvc.yaml names them.
FINETUNE_METRICS, BASELINE_METRICS = metrics_file("finetune").as_posix(), metrics_file("baseline").as_posix()
# Rows that agree on all of these are one run (the baseline is trained again beside every strategy).
SETTINGS = ["strategy", "strategy_name", "labels_per_class", "seed", "head_epochs", "epochs", "batch_size",
            "learning_rate", "backbone", "weights", "image_size"]


@dataclass(frozen=True)
class Point:
    """One experiment of the sweep: its grid values and the name it is queued under."""

    sweep: str
    labels: str  # as given to -S: a count or "null"
    seed: str
    strategy: str

    @property
    def name(self) -> str:
        # Names are git refs: "null" would read as a count, "all" does not.
        return f"{self.sweep}-{'all' if self.labels == ALL else self.labels}-{self.seed}-s{self.strategy}"

    def __str__(self) -> str:
        return f"{self.name} (labels_per_class={self.labels}, seed={self.seed}, strategy={self.strategy})"


def count(labels: str, option: str) -> int | None:
    """Labels per class as given on the command line: a positive count, or None for "null" (all)."""
    if labels == ALL:
        return None
    if not labels.isdigit() or int(labels) == 0:
        raise PipelineError(f"{option}: {labels!r} is neither a positive count of labels per class nor null (all)")
    return int(labels)


def grid(sweep: str, labels: list[str], strategies: list[str], seeds: list[str], seeds_up_to: str = ALL
         ) -> list[Point]:
    """Every point: all seeds up to seeds_up_to labels per class (null: at every count), the first seed above.

    Strategy varies slowest: the queue's next experiments are other (labels, seed) pairs, so each pair's baseline
    trains once, in the first strategy's experiment, and the later strategies restore it from the run-cache (two
    jobs running the same pair at once would both train it).
    """
    limit = count(seeds_up_to, "--seeds-up-to")
    points = []
    for strategy in strategies:
        for label in labels:
            many = limit is None or (count(label, "--labels") or float("inf")) <= limit
            points.extend(Point(sweep, label, seed, strategy) for seed in (seeds if many else seeds[:1]))
    return points


def queue(points: list[Point], extra: list[str]) -> None:
    """Queue each point under its own name, so that collecting keeps exactly these experiments."""
    for point in points:
        dvc("exp", "run", "--queue", "-n", point.name, *extra,
            "-S", f"data.target_labels_per_class={point.labels}",
            "-S", f"strategy={point.strategy}",
            "-S", f"finetune.seed={point.seed}",
            "finetune")  # its upstream stages only: figures and export add nothing to a point


def run_queue(jobs: int, poll_seconds: float = 2.0) -> None:
    """Start the queue workers and wait until they leave (they do once the queue is empty)."""
    dvc("queue", "start", "--jobs", str(jobs))
    while queue_workers_running(Path(".")):
        time.sleep(poll_seconds)


def experiments(shown: list[dict]) -> Iterator[dict]:
    """Every experiment (not the workspace or baseline rows) in `dvc exp show --json` output.

    A queued or failed experiment's name and state sit on its range, not on the revision: copied onto it.
    """
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state")
            for revision in experiment.get("revs", []):
                yield {**revision, "name": revision.get("name") or experiment.get("name"), "state": state}


def strategy_name(params: dict, number: int) -> str:
    """Strategy `number` in words, as the experiment's own params.yaml defines it (profiles redefine some)."""
    entry = params["strategies"][str(number)]  # JSON keys are strings
    return describe_strategy(number, Strategy.model_validate(entry), params["model"]["backbone"])


def rows_of(experiment: dict) -> list[dict]:
    """finetune's row and the from-scratch baseline's, each with the params it ran with.

    A PipelineError says why the experiment is no data point (failed, unfinished, invalid strategy).
    """
    if experiment.get("error") or experiment.get("state") == "failed":
        reason = (experiment.get("error") or {}).get("msg") or "failed"
        raise PipelineError(f"failed ({reason}); see `dvc queue logs {experiment['name']}`")
    data = experiment.get("data") or {}
    params = data.get("params", {}).get("params.yaml", {}).get("data", {})
    metrics = data.get("metrics", {})
    rows = []
    for file, strategy in ((FINETUNE_METRICS, params.get("strategy")), (BASELINE_METRICS, BASELINE)):
        result = metrics.get(file, {}).get("data")
        # A failed run still shows its parent commit's metrics; only a finished one has its own.
        if not params or not result or "test" not in result:
            raise PipelineError(f"has no {file} (state {experiment.get('state') or 'unknown'})")
        try:
            name = strategy_name(params, strategy)
            entry = Strategy.model_validate(params["strategies"][str(strategy)])
            ran = settings(Finetune.model_validate(params["finetune"]), entry)
        except ValueError as error:  # e.g. a layer count beyond the base
            reason = describe(error) if isinstance(error, ValidationError) else str(error)
            raise PipelineError(f"its strategies.{strategy} is invalid ({reason})") from None
        except KeyError:
            raise PipelineError(f"its params.yaml has no strategies.{strategy}") from None
        rows.append({
            "experiment": experiment["name"],
            "strategy": strategy,
            "strategy_name": name,
            "labels_per_class": params["data"]["target_labels_per_class"] or "all",
            "seed": params["finetune"]["seed"],
            "head_epochs": entry.head_epochs,  # phase 1's, before `epochs` of the strategy's own layers
            "epochs": ran.epochs,
            "batch_size": ran.batch_size,
            "learning_rate": ran.learning_rate,
            "backbone": params["model"]["backbone"],
            "weights": params["model"]["weights"],
            "image_size": params["preprocess"]["image_size"],
            "images_per_class": result["train_images"] // len(params["data"]["target_classes"]),
            "test_accuracy": result["test"]["accuracy"],
            "test_macro_f1": result["test"].get("macro_f1"),
        })
    return rows


def collect(shown: list[dict], points: list[Point], skip_failed: bool = False) -> pd.DataFrame:
    """One row per point's finetune run and per distinct baseline run, from exactly the named experiments.

    A failed or missing point is a PipelineError naming it, unless skip_failed, which says what it skips.
    """
    found = {experiment["name"]: experiment for experiment in experiments(shown) if experiment.get("name")}
    rows, problems = [], []
    for point in points:
        try:
            if point.name not in found:
                raise PipelineError("never appeared in `dvc exp show` (not queued, or queued on another commit)")
            rows.extend(rows_of(found[point.name]))
        except PipelineError as error:
            problems.append(f"point {point} {error}")
    if problems and not skip_failed:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"{problems[0]}{more}; nothing written (--skip-failed leaves failed points out)")
    for problem in problems:
        print(f"label_efficiency: skipped {problem}")
    if not rows:
        raise PipelineError(f"no finished experiment of sweep {points[0].sweep} in `dvc exp show`; nothing written")
    table = pd.DataFrame(rows)
    # The baseline trains identically beside each strategy of a (labels, seed): one row, not one per strategy.
    table = table.drop_duplicates(SETTINGS, keep="first")
    return table.sort_values(["strategy", "images_per_class", "seed"]).reset_index(drop=True)


def seeds(counts: pd.Series) -> str:
    """How many seeds a strategy's points have: "3 seeds", or "1-3 seeds" where the label counts differ."""
    fewest, most = int(counts.min()), int(counts.max())
    return f"{most} seeds" if fewest == most else f"{fewest}-{most} seeds"


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6.5))
    for (_, name, head_epochs), group in table.groupby(["strategy", "strategy_name", "head_epochs"]):
        summary = group.groupby("images_per_class")["test_accuracy"].agg(["mean", "std", "count"]).fillna(0)
        x = summary.index.to_numpy()
        # A warm head dashed: the same layers with and without one then read as a pair.
        axes.plot(x, 100 * summary["mean"], marker="o", linestyle="--" if head_epochs else "-",
                  label=f"{name} ({seeds(summary['count'])})")
        axes.fill_between(x, 100 * (summary["mean"] - summary["std"]), 100 * (summary["mean"] + summary["std"]),
                          alpha=0.2)
    axes.set_xscale("log")
    axes.set_xlabel("labelled target images per class (log scale)")
    axes.set_ylabel("target test accuracy (%)")
    axes.set_title("When does transfer pay off? (mean ± std over seeds)")
    axes.grid(True, which="both", alpha=0.3)
    # Below the axes: a strategy's name with its phases is longer than the plot is wide.
    axes.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize="small")
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png", bbox_inches="tight")
    plt.close(figure)


def markdown(table: pd.DataFrame) -> str:
    """Which strategy at which label count: target test accuracy in %, mean ± std over seeds (a single seed: no
    ±), a row per label count, a column per strategy, the best mean of each row in bold; the strategies' names
    below."""
    summary = table.groupby(["images_per_class", "strategy", "strategy_name"])["test_accuracy"].agg(["mean", "std"])
    columns = summary.index.droplevel(0).unique().sort_values()
    lines = ["| labelled images per class | " + " | ".join(str(number) for number, _ in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for images, row in summary.groupby(level="images_per_class"):
        row = row.droplevel(0)
        cells = []
        for column in columns:
            mean, std = row.loc[column] if column in row.index else (None, None)
            cell = "" if mean is None else f"{100 * mean:.1f}" + ("" if pd.isna(std) else f" ± {100 * std:.1f}")
            cells.append(f"**{cell}**" if mean == row["mean"].max() else cell)
        labels = table.loc[table["images_per_class"] == images, "labels_per_class"].iloc[0]
        lines.append(f"| {'all (' if labels == 'all' else ''}{images:,}{')' if labels == 'all' else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *(f"- {name}" for _, name in columns)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="queue and run a new sweep before collecting it")
    parser.add_argument("--sweep", help="sweep id: the prefix of its experiment names (default with --run: le-<time>)")
    parser.add_argument("--labels", default="10,50,250,1000,null", help="labels per class (null = all)")
    parser.add_argument("--strategies", default="1", help="strategies to sweep; baseline adds 0")
    parser.add_argument("--seeds", default="1,2,3", help="finetune.seed values")
    parser.add_argument("--seeds-up-to", default="250",
                        help="labels per class up to which every seed runs; above, and with all labels, the first "
                             "seed alone (null: every seed at every count)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at once")
    parser.add_argument("--skip-failed", action="store_true",
                        help="leave failed or missing points out (and say which) instead of refusing")
    args, extra = parser.parse_known_args()
    if not args.run and not args.sweep:
        raise PipelineError("name the sweep to collect with --sweep ID (the id --run printed), or run one with --run")
    if extra and not args.run:
        raise PipelineError(f"unknown arguments {' '.join(extra)}; -S overrides go with --run")
    sweep = args.sweep or time.strftime("le-%Y%m%d-%H%M%S")
    points = grid(sweep, args.labels.split(","), args.strategies.split(","), args.seeds.split(","), args.seeds_up_to)
    if args.run:
        print(f"label_efficiency: sweep {sweep}, {len(points)} experiments")
        # Queued experiments start from the workspace: bring its pretrain up to date with the same overrides
        # first, so that every experiment finds pretrain done in the cache and reruns baseline and finetune alone
        # (the workspace's own baseline, finetune, figures and export would be no point of the sweep).
        dvc("exp", "run", *extra, "pretrain")
        queue(points, extra)
        run_queue(args.jobs)
    table = collect(json.loads(dvc("exp", "show", "--json")), points, args.skip_failed)
    write_text(LABEL_EFFICIENCY_TABLE, table.to_csv(index=False))
    plot(table, LABEL_EFFICIENCY_PLOT)
    print(markdown(table))
    print(f"label_efficiency: sweep {sweep}, {len(table)} runs -> {LABEL_EFFICIENCY_TABLE}, {LABEL_EFFICIENCY_PLOT}")


if __name__ == "__main__":
    run_stage(main)
