"""`dvc repro` as a job in its own process group, timed stage by stage, and killed whole: the instruments of
benchmarks/kill_sweep.py."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

START = "(dvc)"  # the phase before dvc names its first stage
MARKER = re.compile(r"^(?:Running stage|Stage) '([^']+)'", re.MULTILINE)  # running, skipped or restored from cache
POLL = 0.02  # seconds between looks at a running `dvc repro`


@dataclass
class Timeline:
    """When each phase of an uninterrupted `dvc repro` began (seconds after it started), and when it ended."""

    starts: dict[str, float]
    total: float

    def window(self, phase: str) -> tuple[float, float]:
        names = list(self.starts)
        following = names.index(phase) + 1
        return self.starts[phase], self.starts[names[following]] if following < len(names) else self.total

    def stage_at(self, instant: float) -> str:
        return next(name for name in reversed(self.starts) if self.starts[name] <= instant)


@dataclass
class Run:
    """One `dvc repro` of the sweep: its output files and how it ended."""

    index: int
    out: Path
    err: Path
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def start(command: list[str], cwd: Path, logs: Path, index: int) -> tuple[subprocess.Popen, Run]:
    """`command` in its own process group (as a terminal runs a job), output to files that can be read meanwhile."""
    logs.mkdir(parents=True, exist_ok=True)
    run = Run(index, logs / f"run-{index:02d}.out", logs / f"run-{index:02d}.err")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    with open(run.out, "w") as out, open(run.err, "w") as err:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=True)
    return process, run


def phases_seen(run: Run) -> list[str]:
    return MARKER.findall(run.stdout)


def timed_repro(project: Path, logs: Path) -> Timeline:
    """Run `dvc repro` to the end and note when each stage began; fails if it fails."""
    process, run = start(["dvc", "repro"], project, logs, 0)
    began, starts = time.monotonic(), {START: 0.0}
    while process.poll() is None:
        for name in phases_seen(run):
            starts.setdefault(name, time.monotonic() - began)
        time.sleep(POLL)
    for name in phases_seen(run):  # the last ones, if they came in the last poll
        starts.setdefault(name, time.monotonic() - began)
    if process.returncode != 0:
        raise AssertionError(f"the uninterrupted dvc repro failed ({process.returncode}):\n{run.stderr}")
    return Timeline(starts, time.monotonic() - began)


def kill_instants(timeline: Timeline, kills: int, seed: int) -> list[float]:
    """One instant drawn uniformly in each of `kills` equal slices of the timeline: spread over the whole run."""
    rng = random.Random(seed)
    return [(slice_ + rng.random()) * timeline.total / kills for slice_ in range(kills)]


def instants_in(timeline: Timeline, places: dict[str, float]) -> list[float]:
    """Kill instants at a share of named stages' time on the timeline, e.g. {"preprocess": 0.5}: where a stage is
    at work (a short test's few kills would otherwise mostly land in TensorFlow's start-up)."""
    return sorted(start + share * (end - start)
                  for (start, end), share in ((timeline.window(stage), share) for stage, share in places.items()))


def stage_running(pid: int) -> bool:
    """Whether a `python -m stages.<name>` runs under `pid` (dvc runs each stage's command as its child)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if "stages." in " ".join(child.cmdline()):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to every process in the group, and wait until none is left (none may go on writing)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(POLL)
    raise AssertionError(f"processes of group {process.pid} outlived SIGKILL")
