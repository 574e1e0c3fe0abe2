"""kill -9 of a whole `dvc repro` at random instants, then a last `dvc repro`: the result must be the uninterrupted
run's (issue 23).

    python -m benchmarks.kill_sweep --kills 20 --seed 0 [--fraction 0.01 --epochs 3]

Two copies of the project on the same archive share of CIFAR-10 (small_cnn, 32 px, every stage through export).
The reference runs `dvc repro` once, uninterrupted; the times at which each stage starts in its output make the
pipeline's timeline. The other copy starts from scratch and is killed (SIGKILL to the whole process group: dvc, the
stage and the stage's workers, as an out-of-memory kill or a power cut would) at --kills instants spread over that
timeline (one drawn uniformly in each of --kills equal slices, seeded); after each kill `dvc repro` starts again.
A rerun is killed when it reaches the next instant's place in the pipeline: the reference's start of the stage it
is running, plus the time it has spent in that stage (never past the reference's end of that stage until it reaches
the next one). So each rerun gets further than the one before, and a resumed stage, which is further along than
its time says, is killed no earlier. A last `dvc repro` then runs to the end. The sweep checks that

- metrics (timing fields aside), histories, predictions, figures, the TFLite file and the export's text files are
  identical, so are the archive, data/split and data/tfrecords (their md5 in dvc.lock), and the models and the
  SavedModel hold identical weights (their files record when they were saved);
- `dvc status` is clean;
- no half-replaced output (`.<name>.tmp-<pid>`, `.new-`, `.old-`), checkpoint or feature cache is left
  (checkpoints/ empty or absent);
- no run printed a Python traceback.

Each kill is listed with where it landed: the stage dvc was at, whether that stage's own process was running
(else dvc was doing its own work before or after it), the epochs checkpointed, what checkpoints/ held (a feature
cache: `<stage>/features`), any temporary output left, and what the next run said about it. tests/test_faults.py
runs the same test (kill_test) with 3 kills. RESULT gives the kills, the differences and the killed run's total
time as a ratio of the reference's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import archive_share, arguments, report, workspace
from benchmarks.same_results import differences, problems, temporaries
from benchmarks.timed_repro import (
    POLL,
    START,
    Run,
    Timeline,
    kill_group,
    kill_instants,
    phases_seen,
    stage_running,
    start,
    timed_repro,
)

TRAINING_STAGES = ("pretrain", "baseline", "finetune")


@dataclass
class Kill:
    """Where one kill landed, and what the next run made of it."""

    instant: float  # on the reference timeline
    stage: str  # the phase dvc was in
    stage_process: bool  # the stage's own command was running (else dvc was working before or after it)
    after_seconds: float  # into this rerun
    epochs_checkpointed: dict[str, int] = field(default_factory=dict)
    temporaries: list[str] = field(default_factory=list)  # temporary outputs the kill left
    checkpoints: list[str] = field(default_factory=list)  # what checkpoints/ held: checkpoints, feature caches
    emptied: list[str] = field(default_factory=list)  # DVC's own files it left empty (removed before the next run)
    run: int = 0  # the run it killed
    next_run: list[str] = field(default_factory=list)  # what the next run said about it


def epochs_checkpointed(project: Path) -> dict[str, int]:
    done = {}
    for stage in TRAINING_STAGES:
        state = project / "checkpoints" / stage / "latest" / "state.json"
        try:
            done[stage] = len(json.loads(state.read_text())["history"])
        except (FileNotFoundError, ValueError, KeyError) as error:
            if not isinstance(error, FileNotFoundError):
                done[stage] = -1  # unreadable
    return done


def checkpoint_contents(project: Path) -> list[str]:
    """checkpoints/<stage>/<entry> as `<stage>/<entry>`: `latest` (a checkpoint), `features` (a feature cache)..."""
    return sorted(str(entry.relative_to(project / "checkpoints")) for entry in project.glob("checkpoints/*/*"))


NOTABLE = re.compile(r"^.*(?:resuming|discarding|[Kk]illed|error|ERROR|WARNING|[Ll]ock).*$", re.MULTILINE)
STALE_LOCK = re.compile(r"in RWLock-file '[^']+' had been killed")  # dvc frees a killed run's locks, path by path


def notable(run: Run) -> list[str]:
    """What a rerun said about the state a kill left: resumed or discarded checkpoints, DVC's lock warnings (counted),
    errors."""
    text = run.stdout + run.stderr
    lines = [line.strip() for line in NOTABLE.findall(text)
             if "oneDNN" not in line and "absl::InitializeLog" not in line and "Updating lock file" not in line
             and "Generating lock file" not in line and not STALE_LOCK.search(line)]
    freed = len(STALE_LOCK.findall(text))
    return lines + ([f"dvc freed {freed} stale lock entries of the killed run"] if freed else [])


def sweep(project: Path, timeline: Timeline, instants: list[float], logs: Path,
          timeout: float = 3600) -> tuple[list[Kill], list[Run]]:
    """Kill `dvc repro` in `project` at each of the (sorted) instants of `timeline`, rerunning it after each, then
    run it to the end. Returns the kills and every run (the last one unkilled)."""
    landed, runs = [], []
    deadline = time.monotonic() + timeout
    while True:
        process, run = start(["dvc", "repro"], project, logs, len(runs) + 1)
        runs.append(run)
        began = time.monotonic()
        phase, phase_began = START, began
        target = instants[len(landed)] if len(landed) < len(instants) else None
        while process.poll() is None:
            now = time.monotonic()
            if now > deadline:
                kill_group(process)
                raise AssertionError(f"the sweep took longer than {timeout} s; logs in {logs}")
            seen = phases_seen(run)
            if seen and seen[-1] != phase:
                phase, phase_began = seen[-1], now
            start_at, end_at = timeline.window(phase)
            if target is not None and min(start_at + now - phase_began, end_at) >= target:
                inside = stage_running(process.pid)
                kill_group(process)
                landed.append(Kill(target, phase, inside, round(now - began, 2),
                                   epochs_checkpointed(project), temporaries(project), checkpoint_contents(project),
                                   run=run.index))
                break
            time.sleep(POLL)
        run.returncode, run.seconds = process.wait(), time.monotonic() - began
        if run.returncode != -signal.SIGKILL and landed and dvc_file_emptied(project, run, landed[-1]):
            continue  # DVC's own file, written in place, cleared as docs/troubleshooting.md says; run again
        if run.returncode != -signal.SIGKILL:
            break
    for kill in landed:
        kill.next_run = notable(runs[kill.run])  # runs[i] is run i + 1: the one after
    if runs[-1].returncode != 0:
        raise AssertionError(f"dvc repro (run {runs[-1].index}) failed ({runs[-1].returncode}) after "
                             f"{landed[-1] if landed else 'no kill'}:\n{runs[-1].stdout}\n{runs[-1].stderr}")
    # Fewer kills than instants: a rerun ended before the next instant came (it ran faster than the reference).
    return landed, runs


# DVC 3.67 writes these in place (open "w+", then dump): a kill in between leaves them empty, and every later dvc
# command refuses to run until the file is removed.
DVC_FILES = {"dvc.lock": "'./dvc.lock' validation failed", ".dvc/tmp/rwlock": "Unable to read RWLock-file"}


def dvc_file_emptied(project: Path, run: Run, kill: Kill) -> bool:
    """Whether `run` failed on a DVC file that the kill before it left empty; if so, note it on that kill (a problem
    of the sweep) and remove the file, as a user would."""
    for name, message in DVC_FILES.items():
        if message in run.stdout + run.stderr and (project / name).is_file() and not (project / name).stat().st_size:
            kill.emptied.append(name)
            (project / name).unlink()
            return True
    return False


def kill_test(reference: Path, killed: Path, instants: Callable[[Timeline], list[float]], logs: Path,
              timeout: float = 3600) -> tuple[Timeline, list[Kill], list[Run], list[str]]:
    """The whole test on two fresh copies of a project: `dvc repro` in `reference` uninterrupted, then in `killed`
    with a kill at each of the instants chosen on the reference's timeline; the timeline, the kills, the killed
    project's runs and what differs or is wrong (empty: nothing)."""
    timeline = timed_repro(reference, logs / "reference")
    print(f"reference: {timeline.total:.1f} s; stages began at "
          + ", ".join(f"{name} {at:.1f}" for name, at in timeline.starts.items()), flush=True)
    landed, runs = sweep(killed, timeline, instants(timeline), logs / "killed", timeout)
    for number, kill in enumerate(landed, 1):
        print(f"kill {number:2d} at {kill.instant:6.1f} s ({kill.after_seconds:5.1f} s into run {kill.run}): "
              f"{kill.stage}{'' if kill.stage_process else ' (dvc itself)'}; checkpointed {kill.epochs_checkpointed}; "
              f"held {kill.checkpoints}; left {kill.temporaries}{' and emptied ' if kill.emptied else ''}"
              f"{kill.emptied or ''}; next run: {kill.next_run}", flush=True)
    emptied = [f"kill {number} left {name} empty: the next dvc repro refused to run until it was removed"
               for number, kill in enumerate(landed, 1) for name in kill.emptied]
    return timeline, landed, runs, emptied + differences(killed, reference) + problems(killed, runs)


def dvc_project(name: str, args, overrides: dict[str, object]) -> Path:
    folder = workspace(name, args, overrides)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=folder, check=True)
    return folder


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill instants")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of every class of the archive")
    parser.add_argument("--epochs", type=int, default=3, help="pretrain and finetune epochs")
    args = parser.parse_args()
    here = Path.cwd()
    if args.fraction < 1:
        args.archive, args.md5 = archive_share(args.archive, args.fraction, args.workdir)
    # The CPU profile's network at 32 px; finetune caches the frozen prefix (strategy 2), pretrain and baseline
    # checkpoint every epoch.
    overrides = {"model.backbone": "small_cnn", "model.weights": "none", "model.head_units": 16,
                 "preprocess.image_size": 32, "preprocess.encoding": "raw", "pretrain.epochs": args.epochs,
                 "finetune.epochs": args.epochs, "training.steps_per_execution": 1, "training.shuffle_buffer": 64,
                 "training.deterministic": True, "strategy": 2}
    root = args.workdir / "kill_sweep"
    shutil.rmtree(root, ignore_errors=True)
    reference = dvc_project("kill_sweep/reference", args, overrides)
    killed = dvc_project("kill_sweep/killed", args, overrides)
    os.chdir(here)
    def instants(timeline: Timeline) -> list[float]:
        return kill_instants(timeline, args.kills, args.seed)

    timeline, landed, runs, found = kill_test(reference, killed, instants, root / "logs")
    for problem in found:
        print("PROBLEM", problem)
    report({"kills": len(landed), "kills_asked": args.kills, "seed": args.seed,
            "landed": {stage: sum(kill.stage == stage for kill in landed) for stage in timeline.starts},
            "in_stage_process": sum(kill.stage_process for kill in landed), "runs": len(runs),
            "reference_seconds": round(timeline.total, 1),
            "killed_over_reference": round(sum(run.seconds for run in runs) / timeline.total, 2),
            "identical": not found, "problems": found,
            "kill_list": [dataclasses.asdict(kill) for kill in landed]})


if __name__ == "__main__":
    main()
