"""While a queued experiment trains, `dvc exp show` shows its latest epoch and `dvc plots diff <name>` its
curve so far: the real dvc queue, polled.

DVC 3 collects a running queued experiment by opening its temporary workspace (.dvc/tmp/exps/...) as a
repo and reading the metrics files dvc.yaml declares there (dvc/repo/experiments/queue/celery.py,
collect_active_data). A training stage writes its latest epoch into its own metrics file under `live`
every epoch, and its final metrics replace it when it ends; it rewrites its history CSV every epoch too, which
`dvc plots diff` reads from the same temporary workspace for a running experiment's name.
"""

from __future__ import annotations

import json
import time

import pytest
from helpers import copy_project, finish, run, set_params, start
from test_experiments import wait_for_queue

from tools.label_efficiency import experiments

EPOCHS = 60  # a third of a second each on the tiny archive here (checkpoint included): long enough to watch
POLL_DEADLINE_S = 600


def shown(project, command: list[str], while_running: bool = False) -> dict | None:
    """The JSON a dvc command prints. While a queued experiment runs, None when the command failed: DVC reads
    the experiment's temporary workspace, which the queue creates and removes under it."""
    result = run(command, project, check=not while_running)
    return json.loads(result.stdout) if result.returncode == 0 else None


def pretrain_curve(project, experiment: str, while_running: bool = False) -> list[dict] | None:
    """The rows of metrics/pretrain_history.csv that `dvc plots diff <experiment> --json` shows for it."""
    plots = shown(project, ["dvc", "plots", "diff", experiment, "--json"], while_running)
    if plots is None:
        return None
    rows = []
    for entry in plots.get("data", {}).get("metrics/pretrain_history.csv", []):
        rows += [row for row in entry["content"]["data"]["values"] if row.get("rev") == experiment]
    return rows


def pretrain_metrics(project, while_running: bool = False) -> dict[str, tuple[str | None, dict | None]]:
    """{experiment name: (its state, metrics/pretrain.json as `dvc exp show --json` reports it)}."""
    table = shown(project, ["dvc", "exp", "show", "--json"], while_running)
    found = {}
    for experiment in experiments(table or []):
        files = (experiment.get("data") or {}).get("metrics") or {}
        found[experiment["name"]] = (experiment["state"], (files.get("metrics/pretrain.json") or {}).get("data"))
    return found


@pytest.fixture(scope="module")
def watched(tmp_path_factory, finished_project):
    """Queue a long pretrain, start the queue and poll `dvc exp show` and `dvc plots diff` while it runs: the live
    epochs and the curves seen."""
    # A copy of a project that ran: the experiment takes the data stages from the run-cache and trains at once.
    project = copy_project(finished_project.project, tmp_path_factory.mktemp("live") / "p")
    set_params(project / "params.yaml", {"pretrain.epochs": EPOCHS})
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a long pretrain"], project)
    run(["dvc", "exp", "run", "--queue", "-n", "watched", "pretrain"], project)
    # Not run(): the worker it starts inherits its output, and capturing that would wait for the worker to end.
    started = finish(start(["dvc", "queue", "start"], project), timeout=120)
    assert started.returncode == 0, started.stderr
    seen, curves = [], []
    deadline = time.monotonic() + POLL_DEADLINE_S
    while time.monotonic() < deadline:
        state, metrics = pretrain_metrics(project, while_running=True).get("watched", (None, None))
        if state == "running" and metrics and "live" in metrics:
            seen.append(metrics["live"])
            # None or no rows: the experiment ended between the two commands and its workspace went with it.
            if curve := pretrain_curve(project, "watched", while_running=True):
                curves.append(curve)
        if state in ("success", "failed") or len({len(curve) for curve in curves}) >= 3:
            break
        time.sleep(2)  # not faster: DVC's file broker and a busy poller do not mix (treeverse/dvc-task#73)
    status = wait_for_queue(project)
    return project, seen, curves, status


def test_exp_show_shows_the_latest_epoch_of_a_running_experiment(watched):
    _, seen, _, status = watched
    assert "Success" in status, status
    epochs = [live["epoch"] for live in seen]
    assert len(set(epochs)) >= 3, seen  # it moved on while we watched
    assert epochs == sorted(epochs) and all(1 <= epoch <= EPOCHS for epoch in epochs)
    for live in seen:
        assert live["epochs"] == EPOCHS
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(live)


def test_plots_show_the_curve_so_far_of_a_running_experiment(watched):
    project, _, curves, _ = watched
    lengths = [len(curve) for curve in curves]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # it grew while the experiment ran
    final = pretrain_curve(project, "watched")  # the finished experiment's history, as committed
    assert len(final) == EPOCHS
    for curve in curves:  # every curve seen was the final one so far, value for value
        assert curve == final[:len(curve)]


def test_the_finished_experiment_shows_its_results_not_an_epoch(watched):
    project, _, _, _ = watched
    state, metrics = pretrain_metrics(project)["watched"]
    assert state == "success"
    assert "live" not in metrics
    assert metrics["epochs"] == EPOCHS and metrics["keep"] == "best"
    # Its results are the kept epoch's model, evaluated: the epoch of the highest val_accuracy in the curve it
    # committed (the later on ties), whose validation scores fit() measured as the evaluation does.
    curve = pretrain_curve(project, "watched")
    val_accuracies = [float(row["val_accuracy"]) for row in curve]
    kept = len(curve) - val_accuracies[::-1].index(max(val_accuracies))
    assert metrics["kept_epoch"] == kept, (metrics["kept_epoch"], val_accuracies)
    assert metrics["val"]["accuracy"] == pytest.approx(val_accuracies[kept - 1], abs=1e-6)
    assert metrics["val"]["loss"] == pytest.approx(float(curve[kept - 1]["val_loss"]), rel=1e-4, abs=1e-6)
    assert metrics["test"]["accuracy"] >= 0.6  # chance is 0.2: 60 epochs learned the tiny archive's classes


def test_a_stage_refuses_metrics_that_are_still_live(tmp_path):
    """An interrupted baseline leaves its latest epoch in metrics/baseline.json: finetune must not take it
    for results (one line naming the file and the stage, no KeyError)."""
    from transfer.errors import PipelineError
    from transfer.reports import read_metrics

    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"live": {"epoch": 3, "epochs": 10, "val_accuracy": 0.5}}))
    with pytest.raises(PipelineError, match=r"baseline.json is from an unfinished baseline run \(epoch 3 of 10\): "
                                            r"rerun the baseline stage \(dvc repro\)$"):
        read_metrics(path, made_by="baseline")
