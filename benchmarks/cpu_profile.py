"""The CPU profile end to end, as a newcomer runs it: the README's command in a fresh clone of a commit.

    python -m benchmarks.cpu_profile [--rev HEAD] [--extra '-S strategy=2']...

Clones `--rev` of this checkout into --workdir with `../shared` beside it (a link to --shared, by default this
checkout's ../shared), runs `dvc exp run -n cpu-profile $(cat profiles/cpu.args)` there under /usr/bin/time, then one
`dvc exp run` per --extra (more overrides on top of the profile's, e.g. all labels or another strategy; each
starts from the committed params.yaml), and
prints each run's wall and CPU seconds (user+sys: what a loaded machine inflates least), the load average
before and after, the training stages' own wall and train seconds, and their test accuracies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from benchmarks.common import ROOT, arguments, report

COMMAND = "dvc exp run -n {name} $(cat profiles/cpu.args)"
TIME_FORMAT = "TIME %e %U %S"  # wall, user, sys seconds


def load() -> float:
    return os.getloadavg()[0]


def timed(command: str, cwd: Path, log: Path) -> dict:
    """`command` in bash under /usr/bin/time, its output in `log`; wall and CPU seconds, load before and after."""
    before = load()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", TIME_FORMAT, "bash", "-c", command], cwd=cwd, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    wall, user, system = map(float, re.findall(r"^TIME (\S+) (\S+) (\S+)$", log.read_text(), re.M)[-1])
    if done.returncode:
        raise SystemExit(f"{command} failed (exit {done.returncode}); see {log}")
    return {"command": command, "wall_seconds": wall, "cpu_seconds": round(user + system, 1),
            "load_before": round(before, 2), "load_after": round(load(), 2)}


def stages(project: Path) -> dict:
    """The training stages' wall and train seconds and test accuracy, from their metrics."""
    found = {}
    for stage in ("pretrain", "baseline", "finetune"):
        metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
        found[stage] = {"wall_seconds": metrics["timing"]["wall_seconds"],
                        "train_seconds": metrics["timing"]["train_seconds"],
                        "test_accuracy": metrics["test"]["accuracy"], "strategy": metrics["strategy"],
                        "train_images": metrics.get("train_images")}
    return found


def main() -> None:
    parser = arguments(__doc__, archive=False)  # the clone's params.yaml names its data: ../shared's copy
    parser.add_argument("--rev", default="HEAD", help="the commit to clone")
    parser.add_argument("--extra", action="append", default=[], help="overrides for one more experiment")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="what ../shared links to")
    args = parser.parse_args()
    folder = args.workdir / "cpu_profile"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "shared").symlink_to(args.shared.resolve())
    project = folder / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    commit = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    subprocess.run(["git", "checkout", "-q", commit], cwd=project, check=True)
    for key, value in (("user.name", "benchmark"), ("user.email", "benchmark@example.com")):
        subprocess.run(["git", "config", key, value], cwd=project, check=True)  # dvc exp run commits
    runs = [{**timed(COMMAND.format(name="cpu-profile"), project, folder / "cpu-profile.log"),
             "stages": stages(project)}]
    for index, extra in enumerate(args.extra):
        name = f"extra-{index}"
        # dvc exp run leaves the last experiment's params in the workspace: each extra is the profile and itself.
        subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=project, check=True)
        runs.append({**timed(f"{COMMAND.format(name=name)} {extra}", project, folder / f"{name}.log"),
                     "stages": stages(project)})
    report({"benchmark": "cpu_profile", "commit": commit[:7], "cores": os.cpu_count(), "runs": runs})


if __name__ == "__main__":
    main()
