"""Which model is the product (training.keep), and what a run shows while it trains, with the real stages.

At a high learning rate the tiny archive's validation accuracy rises and falls, so the best epoch is not the
last. The kept model is then checked against a run that stops at the kept epoch with training.keep=last: the
same weights and the same scores. Both paths are covered: pretrain trains through the network and checkpoints
every epoch, finetune (strategy 1) trains the head on cached features.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_PARAMS, copy_project, environment, run, run_stage, set_params, weights

EPOCHS = 6
BARS = ("caching features of train", "evaluating test", "batch/s")  # what the progress bars say
# Checked: pretrain keeps epoch 5 (tied with epoch 4: the later wins) and finetune epoch 2, both of 6.
ERRATIC = {"pretrain.epochs": EPOCHS, "pretrain.learning_rate": 0.01, "finetune.epochs": EPOCHS,
           "finetune.learning_rate": 0.05}


@pytest.fixture(scope="module")
def project(tmp_path_factory, finished_project) -> Path:
    """Raw TFRecords at 32 px (the tiny sizes'), then pretrain run (with training.keep=best) as finetune needs it.

    A copy of a project that ran: its split, and its baseline's metrics, which finetune only reports its gain over.
    """
    project = copy_project(finished_project.project, tmp_path_factory.mktemp("kept") / "p")
    set_params(project / "params.yaml", {**ERRATIC, "preprocess.encoding": TINY_PARAMS["preprocess.encoding"]})
    run(["dvc", "repro", "preprocess"], project)
    trained(project, "pretrain")
    return project


def metrics(project: Path, stage: str) -> dict:
    return json.loads((project / f"metrics/{stage}.json").read_text())


def val_accuracies(project: Path, stage: str) -> list[float]:
    rows = (project / f"metrics/{stage}_history.csv").read_text().splitlines()
    column = rows[0].split(",").index("val_accuracy")
    return [float(row.split(",")[column]) for row in rows[1:]]


def trained(project: Path, stage: str) -> subprocess.CompletedProcess:
    result = run_stage(stage, project)
    assert result.returncode == 0, result.stderr
    return result


def assert_one_line_per_epoch(logged: subprocess.CompletedProcess) -> None:
    """Output that is no terminal (CI, DVC's logs) has no progress bar: one line per epoch, as it always had."""
    for bar in BARS:
        assert bar not in logged.stdout + logged.stderr, bar
    assert "\r" not in logged.stdout + logged.stderr
    epoch_lines = [line for line in logged.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" - ")[0] for line in epoch_lines] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]


def assert_keeps_the_best_epoch(project: Path, stage: str, model: str) -> None:
    """The stage (keep=best) kept its best epoch, and stopping there with keep=last gives the same model."""
    best = metrics(project, stage)
    scores = val_accuracies(project, stage)
    assert len(scores) == best["epochs"] == EPOCHS
    kept = best["kept_epoch"]
    assert best["keep"] == "best" and kept == max(e for e, s in enumerate(scores, 1) if s == max(scores))
    assert kept < EPOCHS and scores[kept - 1] > scores[-1]  # keeping the best changes the model
    assert best["val"]["accuracy"] == pytest.approx(scores[kept - 1], abs=1e-6)  # scored: the kept epoch
    best_weights = weights(project / model)

    set_params(project / "params.yaml", {"training.keep": "last", f"{stage}.epochs": kept})
    try:
        trained(project, stage)
    finally:
        set_params(project / "params.yaml", {"training.keep": "best", f"{stage}.epochs": EPOCHS})
    last = metrics(project, stage)
    assert last["keep"] == "last" and last["kept_epoch"] == last["epochs"] == kept
    for split in ("train", "val", "test"):
        assert last[split] == best[split], split
    assert all(np.array_equal(a, b) for a, b in zip(best_weights, weights(project / model), strict=True))


def test_pretrain_saves_and_scores_its_best_epoch(project):
    assert_keeps_the_best_epoch(project, "pretrain", "models/pretrained.keras")


def test_finetune_on_cached_features_saves_and_scores_its_best_epoch(project):
    logged = trained(project, "finetune")
    assert "caching the frozen prefix's" in logged.stdout  # the cached-features path, which keeps no checkpoint
    assert_one_line_per_epoch(logged)
    assert_keeps_the_best_epoch(project, "finetune", "models/finetuned.keras")


def on_a_terminal(command: list[str], cwd: Path) -> str:
    """What `command` writes to a pseudo-terminal (stdout and stderr), as a person running it would see."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows of 120 columns
    process = subprocess.Popen(command, cwd=cwd, stdin=follower, stdout=follower, stderr=follower, env=environment())
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal(project):
    """finetune caches features, trains and evaluates: a bar for each on a terminal (none in a log, see
    assert_one_line_per_epoch)."""
    shown = on_a_terminal([sys.executable, "-m", "stages.finetune"], project)
    for bar in (*BARS, f"epoch 1/{EPOCHS}:", f"epoch {EPOCHS}/{EPOCHS}:", "evaluating val"):
        assert bar in shown, bar
