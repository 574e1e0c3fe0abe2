"""The pull-request report: what changed between two revisions, as Markdown.

    python -m tools.report --base main [--target REV] [--output report.md]

It asks the dvc CLI itself: `dvc metrics diff --all --json`, `dvc params diff --md`
and `dvc plots diff --json`. Without --target the workspace is compared (what
`dvc exp run` just produced). A line names the fine-tuning strategy of each side with its phases
(a warm head, then the strategy's layers). The metrics lead with a headline table, readable in
seconds: for every metrics file (stage) with a change, its HEADLINE metrics, changed
or not. Every other changed metric follows in collapsed <details> sections
(per-class scores, timing, the rest), in the same columns as `dvc metrics diff --md`.
Images of changed image plots are copied next to the report, so `cml comment update`
can upload them; changed data plots (curves, confusion matrix) are named, to be
opened with `dvc plots diff`. Not a pipeline stage: it compares pipeline results,
it does not make one.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from tools.dvc import dvc
from transfer.config import PARAMS_FILE, Strategy
from transfer.errors import run_stage
from transfer.outputs import remove, write_text
from transfer.strategies import describe


def changed_plots(plots: dict, order: list[str], report_dir: Path) -> tuple[list[str], dict[str, list]]:
    """Names of the data plots whose data differ between revisions, and the image plots that differ:
    {name: [(revision, image path relative to report_dir)]}, revisions in `order` (base first)."""
    data_plots, images = [], defaultdict(list)
    for name, entries in plots.items():
        for entry in entries:
            if entry["type"] == "vega" and _data_differs(entry["content"]):
                data_plots.append(name)
            elif entry["type"] == "image":
                images[name].append((entry["revisions"][0], Path(entry["url"]).resolve()))
    changed = {}
    for name, shown in images.items():
        if len(shown) == 1 or len({path.read_bytes() for _, path in shown}) > 1:  # new, gone or redrawn
            shown.sort(key=lambda pair: order.index(pair[0]) if pair[0] in order else len(order))
            changed[name] = [(rev, path.relative_to(report_dir.resolve())) for rev, path in shown]
    return data_plots, changed


def _data_differs(content: dict) -> bool:
    rows: dict[str, list] = defaultdict(list)
    for row in content.get("data", {}).get("values", []):
        rows[row.get("rev")].append(json.dumps({k: v for k, v in row.items() if k != "rev"}, sort_keys=True))
    return len(rows) == 1 or len({tuple(sorted(values)) for values in rows.values()}) > 1


HEADLINE = ("test.accuracy", "test.macro_f1", "gain_over_scratch", "trainable_params", "kept_epoch")
DETAILS = (  # (summary, which metrics), the first that matches takes a metric
    ("Per-class test scores", lambda metric: metric.startswith("test.per_class")),
    ("Timing", lambda metric: metric.startswith("timing.")),
    ("Other metrics", lambda metric: True),
)
PRECISION = 5  # digits after the decimal point, as dvc metrics diff rounds them


def metrics_tables(diff: dict, base: str, target: str) -> str:
    """`dvc metrics diff --all --json` output as Markdown: the headline table, then the other changed metrics
    in collapsed sections. Columns and Change (target minus base) as `dvc metrics diff --md` shows them."""
    changed = {path: {metric: change for metric, change in metrics.items() if _changed(change)}
               for path, metrics in diff.items()}
    headline = [(path, metric, diff[path][metric]) for path in diff if changed[path]
                for metric in HEADLINE if metric in diff[path]]
    if not any(changed.values()):
        return "No metric changed."
    sections = [_table(headline, base, target)] if headline else []
    rest = [(path, metric, change) for path, metrics in changed.items() for metric, change in sorted(metrics.items())
            if metric not in HEADLINE]
    for summary, belongs in DETAILS:
        rows = [row for row in rest if belongs(row[1])]
        rest = [row for row in rest if not belongs(row[1])]
        if rows:
            sections.append(f"<details><summary>{summary}: {len(rows)} changed</summary>\n\n"
                            f"{_table(rows, base, target)}\n\n</details>")
    return "\n\n".join(sections)


def _changed(change: dict) -> bool:
    return change.get("old") != change.get("new")


def _table(rows: list[tuple[str, str, dict]], base: str, target: str) -> str:
    lines = [f"| Path | Metric | {base} | {target} | Change |", "|---|---|---|---|---|"]
    lines += [f"| {path} | {metric} | " + " | ".join(_shown(change.get(key)) for key in ("old", "new", "diff")) + " |"
              for path, metric, change in rows]
    return "\n".join(lines)


def _shown(value: object) -> str:
    if value is None:
        return "-"
    return str(round(value, PRECISION) if isinstance(value, float) else value)


def strategy_headline(params: dict, base: str, target: str) -> str | None:
    """Which fine-tuning strategy each side ran, named with its phases (transfer.strategies.describe), from
    `dvc params diff --all --json` output; None when params.yaml names none (or not one that validates)."""
    named = {}
    for side, rev in (("old", base), ("new", target)):
        values = {key: change.get(side) for key, change in params.get(str(PARAMS_FILE), {}).items()}
        entry = {key.split(".", 2)[2]: value for key, value in values.items()
                 if key.startswith(f"strategies.{values.get('strategy')}.") and value is not None}
        try:
            named[rev] = describe(values["strategy"], Strategy.model_validate(entry), values["model.backbone"])
        except (KeyError, ValueError):  # a side without the strategy's params: nothing to name
            continue
    if not named:
        return None
    if len(set(named.values())) == 1:
        return f"**Fine-tuning strategy**: {next(iter(named.values()))}"
    return "**Fine-tuning strategy**: " + "; ".join(f"`{rev}`: {text}" for rev, text in named.items())


def build_report(base: str, target: str | None, output: Path) -> str:
    revs = [base] if target is None else [base, target]
    shown = f"`{target}`" if target else "this change"
    diff = json.loads(dvc("metrics", "diff", *revs, "--all", "--json") or "{}")
    metrics = metrics_tables(diff, base, target or "workspace")
    strategy = strategy_headline(json.loads(dvc("params", "diff", *revs, "--all", "--json") or "{}"), base,
                                 target or "workspace")
    params = dvc("params", "diff", *revs, "--md").strip()
    folder = output.parent / f"{output.stem}_plots"
    remove(folder)  # images of an earlier report must not pass for this one's
    plots = json.loads(dvc("plots", "diff", *revs, "--json", "-o", str(folder)) or "{}").get("data", {})
    data_plots, images = changed_plots(plots, [*revs, "workspace"], output.parent)
    lines = [f"## Pipeline report: {shown} against `{base}`", "", *([strategy, ""] if strategy else []),
             "### Metrics", "",
             metrics, "", "### Params", "", params or "No param changed.", "",
             "### Plots", ""]
    if data_plots:
        names = ", ".join(f"**{name}**" for name in data_plots)
        lines += [f"Changed: {names}. Open them with `dvc plots diff {' '.join(revs)}`.", ""]
    for name, pictures in images.items():
        lines += [f"#### {name}", "", "| " + " | ".join(rev for rev, _ in pictures) + " |",
                  "|" + " --- |" * len(pictures),
                  "| " + " | ".join(f"![{rev}]({path.as_posix()})" for rev, path in pictures) + " |", ""]
    if not data_plots and not images:
        lines += ["No plot changed.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision (or experiment branch) to compare against")
    parser.add_argument("--target", help="git revision to compare; default: the workspace")
    parser.add_argument("--output", type=Path, default=Path("report.md"), help="Markdown file to write")
    arguments = parser.parse_args()
    report = build_report(arguments.base, arguments.target, arguments.output)
    write_text(arguments.output, report)
    print(f"report: {arguments.output}")


if __name__ == "__main__":
    run_stage(main)
