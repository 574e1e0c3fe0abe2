"""The dvc CLI as the tools call it: one command at a time, and whether the experiment queue still works."""

from __future__ import annotations

import subprocess
from pathlib import Path

from transfer.errors import PipelineError

OVERRIDE_FLAGS = ("-S", "--set-param")


def dvc(*arguments: str) -> str:
    """stdout of `dvc <arguments>`; a failure is a PipelineError naming the command and dvc's last line."""
    command = ["dvc", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise PipelineError(f"`{_shown(command)}` failed: {lines[-1]}")
    return result.stdout


def _shown(command: list[str]) -> str:
    """The command as an error names it: up to its first -S override.

    A sweep's overrides (a profile's and the grid) would make the one-line error several lines long.
    """
    for index, word in enumerate(command):
        if word in OVERRIDE_FLAGS:
            return " ".join([*command[:index], "..."])
    return " ".join(command)


def queue_workers_running(project: Path) -> bool:
    """Whether a `dvc queue` worker of `project` is alive: a worker pid file naming a live process.

    Pid files rather than `dvc queue status`: frequent status calls can race with a
    worker on DVC's file-system broker and stop it (treeverse/dvc-task#73).
    """
    pid_files = (project / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid")
    return any(Path(f"/proc/{pid.read_text().strip()}").exists() for pid in pid_files if pid.is_file())
