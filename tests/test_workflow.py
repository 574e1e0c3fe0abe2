"""The pull-request workflows, rehearsed end to end.

pr-report.yml (on pull_request: runs base and pull request, uploads the report) and pr-comment.yml (on
workflow_run: posts it) are executed step by step, their `run:` scripts read from the YAML files, in clones
of a git repository of the project that holds a base commit and a pull-request commit (strategy 2), with the
environment GitHub sets. A step that calls an action (`uses:`) is replaced by what that action does here
(see Runner.action), and a recording `cml` on PATH stands in for CML, which the package registries this
project reaches do not have. The pipeline runs in a tiny profile instead of profiles/cpu.args.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides
from helpers import ROOT, make_project, run, set_params

from transfer.config import load_params

WORKFLOWS = ROOT / ".github/workflows"
REPORT, COMMENT, TESTS = (WORKFLOWS / f"{name}.yml" for name in ("pr-report", "pr-comment", "tests"))
# On top of make_project's tiny params; up to `figures`: export (SavedModel, TFLite) makes nothing the report reads.
TINY_PROFILE = "figures -S pretrain.epochs=1 -S finetune.epochs=1\n"
NUMBER = 7
VENV_BIN = str(Path(sys.executable).parent)
REPORT_RUN_ID = 1001
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
# Stands in for CML: records its arguments, its environment's CML switches and the file it was given.
FAKE_CML = """#!{python}
import json, os, sys
from pathlib import Path
files = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
record = {{"args": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in ("ITERATIVE_DO_NOT_TRACK", "REPO_TOKEN")}},
          "files": {{str(f): f.read_text() for f in files if f.is_file()}}}}
with open({record!r}, "a") as out:
    out.write(json.dumps(record) + "\\n")
"""


def workflow(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@dataclass
class Step:
    name: str
    outcome: str  # success, failure or skipped
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


@dataclass
class Runner:
    """A fresh GitHub-hosted runner, as far as these workflows need one: a workspace, RUNNER_TEMP, the event,
    and the actions they call replaced by what those do. `artifacts` is the artifact store shared by runs."""

    root: Path
    origin: Path  # the repository on GitHub
    artifacts: Path
    bin: Path  # holds the recording cml
    event_name: str
    event: dict
    sha: str  # GITHUB_SHA
    run_id: int
    env: dict = field(default_factory=dict)  # overrides of the workflow's env (the profile)
    steps: list[Step] = field(default_factory=list)
    python: bool = False  # whether actions/setup-python ran: this venv's python on PATH, not the runner's own

    def __post_init__(self):
        self.workspace, self.temp = self.root / "workspace", self.root / "temp"
        for folder in (self.workspace, self.temp):
            folder.mkdir(parents=True)
        self.event_path = self.root / "event.json"
        self.event_path.write_text(json.dumps(self.event))
        self.contexts = {
            "github": {"event": self.event, "event_name": self.event_name, "sha": self.sha, "run_id": self.run_id,
                       "repository": "owner/cifar10-transfer", "token": "test-token"},
            "runner": {"temp": str(self.temp)}, "secrets": {"GITHUB_TOKEN": "test-token"}, "steps": {}, "env": {}}

    def run(self, path: Path) -> list[Step]:
        """Run the workflow's one job, step by step, as GitHub would; the steps' outcomes."""
        parsed = workflow(path)
        [(_, job)] = parsed["jobs"].items()
        self.contexts["env"] = {**self.substituted(parsed.get("env", {})), **self.env}
        if "if" in job and not self.condition(job["if"]):
            return []
        self.contexts["env"].update({**self.substituted(job.get("env", {})), **self.env})
        for number, step in enumerate(job["steps"]):
            name = step.get("name") or step.get("uses") or step["run"].splitlines()[0]
            if not self.condition(step.get("if", "success()")):
                self.steps.append(Step(name, "skipped"))
                continue
            started = time.monotonic()
            if "uses" in step:
                result = self.action(step["uses"].split("@")[0], self.substituted(step.get("with", {})))
            elif step["run"].startswith("pip install"):
                # The install step is skipped: the test already runs in the installed project (this venv).
                result = Step(name, "skipped")
            else:
                result = self.script(step, number)
            result.name, result.seconds = name, time.monotonic() - started
            self.steps.append(result)
        return self.steps

    def failed(self) -> bool:
        return any(step.outcome == "failure" for step in self.steps)

    def condition(self, expression: str) -> bool:
        """The few `if:` expressions the workflows use; any other stops the test rather than pass unread."""
        expression = EXPRESSION.sub(r"\1", expression).strip()
        status = {"success()": not self.failed(), "failure()": self.failed(), "always()": True,
                  "!cancelled()": True}  # nothing is cancelled in a rehearsal
        if expression in status:
            return status[expression]
        if match := re.fullmatch(r"([\w.-]+) == '([^']*)'", expression):
            return self.value(match[1]) == match[2]
        raise ValueError(f"the rehearsal cannot evaluate `if: {expression}`")

    def value(self, path: str) -> object:
        found: object = self.contexts
        for key in path.split("."):
            found = found.get(key) if isinstance(found, dict) else None
        return "" if found is None else found

    def substituted(self, values: dict) -> dict:
        return {key: EXPRESSION.sub(lambda match: str(self.value(match[1])), str(value))
                for key, value in values.items()}

    def script(self, step: dict, number: int) -> Step:
        """A `run:` step: bash -eo pipefail (GitHub's default shell) in the workspace, with GitHub's variables."""
        output = self.temp / f"output-{number}"
        output.touch()
        script = self.temp / f"step-{number}.sh"
        script.write_text(step["run"])
        env = {**_clean(os.environ), **self.contexts["env"], **self.substituted(step.get("env", {})),
               "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": self.event_name,
               "GITHUB_EVENT_PATH": str(self.event_path), "GITHUB_SHA": self.sha, "GITHUB_RUN_ID": str(self.run_id),
               "GITHUB_REPOSITORY": "owner/cifar10-transfer", "GITHUB_SERVER_URL": "https://github.com",
               "GITHUB_WORKSPACE": str(self.workspace), "GITHUB_OUTPUT": str(output), "RUNNER_TEMP": str(self.temp),
               "PATH": ":".join([str(self.bin), *([VENV_BIN] if self.python else []), *_outside_venv(os.environ)]),
               "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=self.workspace,
                                env=env, capture_output=True, text=True)
        if "id" in step:
            lines = output.read_text().splitlines()
            self.contexts["steps"][step["id"]] = {"outputs": dict(line.split("=", 1) for line in lines if "=" in line)}
        return Step("", "success" if result.returncode == 0 else "failure", result.stdout, result.stderr)

    def action(self, action: str, given: dict) -> Step:
        """What each action the workflows call does, done here."""
        if action == "actions/checkout":  # the clone at that SHA (default: GITHUB_SHA)
            run(["git", "clone", "-q", str(self.origin), "."], self.workspace)
            run(["git", "checkout", "-q", "--detach", given.get("ref") or self.sha], self.workspace)
        elif action == "actions/setup-python":
            self.python = True  # this venv (the project installed) stands in for the python it sets up
        elif action == "actions/cache":
            pass  # a cold cache (a first run): nothing restored; saving it afterwards changes nothing here
        elif action == "iterative/setup-cml":
            pass  # the recording cml is on PATH
        elif action == "actions/upload-artifact":
            source = Path(given["path"])
            if not source.is_dir() or not any(source.iterdir()):
                return Step("", "failure", stderr=f"no files at {source}")
            shutil.copytree(source, self.artifacts / str(self.run_id) / given["name"])
        elif action == "actions/download-artifact":
            source = self.artifacts / given["run-id"] / given["name"]
            if not source.is_dir():
                return Step("", "failure", stderr=f"artifact {given['name']} of run {given['run-id']} not found")
            shutil.copytree(source, given["path"], dirs_exist_ok=True)
        else:
            raise ValueError(f"the rehearsal does not know what {action} does")
        return Step("", "success")


def _clean(environ) -> dict:
    """This process's environment without what a GitHub runner would set itself, or an activated venv."""
    return {key: value for key, value in environ.items()
            if not key.startswith(("GITHUB_", "RUNNER_")) and key != "VIRTUAL_ENV"}


def _outside_venv(environ) -> list[str]:
    """PATH without this venv: a job that does not set up Python (pr-comment.yml) gets the runner's python3,
    which does not have the project's dependencies."""
    return [folder for folder in environ["PATH"].split(":") if folder and folder != VENV_BIN]


def commit(repo: Path, message: str) -> str:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", message], repo)
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


def pull_request_event(base: str, head: str) -> dict:
    return {"action": "synchronize", "number": NUMBER, "pull_request": {
        "number": NUMBER, "base": {"ref": "main", "sha": base}, "head": {"ref": "patch-1", "sha": head,
                                                                         "repo": {"fork": True}}}}


def workflow_run_event(run_id: int, head: str, conclusion: str) -> dict:
    # pull_requests is empty for a fork's pull request: the number can only come from the artifact.
    return {"action": "completed", "workflow_run": {
        "id": run_id, "event": "pull_request", "conclusion": conclusion, "head_sha": head, "pull_requests": [],
        "html_url": f"https://github.com/owner/cifar10-transfer/actions/runs/{run_id}"}}


@dataclass
class Rehearsal:
    report: Runner
    comment: Runner | None
    records: list[dict]


class Project:
    """The repository on GitHub (`origin`) with its commits, the artifact store, and the recording cml."""

    def __init__(self, root: Path, archive: Path):
        self.root, self.artifacts, self.bin = root, root / "artifacts", root / "bin"
        self.bin.mkdir(parents=True)
        self.record = root / "cml.jsonl"
        (self.bin / "cml").write_text(FAKE_CML.format(python=sys.executable, record=str(self.record)))
        (self.bin / "cml").chmod(0o755)
        self.profile = root / "tiny.args"
        self.profile.write_text(TINY_PROFILE)
        self.origin = make_project(root / "origin", archive)
        # One DVC cache for every clone (a test speed-up, not part of the workflow): the second pull request
        # below reruns nothing the first one ran.
        run(["dvc", "config", "cache.dir", str(root / "dvc-cache")], self.origin)
        self.main = commit(self.origin, "base: the project, tiny")
        self.runs = 0

    def records(self) -> list[dict]:
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        return [json.loads(line) for line in lines]

    def report(self, name: str, base: str, head: str) -> Runner:
        self.runs += 1
        runner = Runner(self.root / name, self.origin, self.artifacts, self.bin, "pull_request",
                        pull_request_event(base, head), head, REPORT_RUN_ID + self.runs,
                        env={"PIPELINE_PROFILE": str(self.profile), "CIFAR10_MD5": _md5_in(self.origin)})
        runner.run(REPORT)
        return runner

    def comment(self, name: str, run_id: int, head: str, conclusion: str = "success") -> Runner:
        runner = Runner(self.root / name, self.origin, self.artifacts, self.bin, "workflow_run",
                        workflow_run_event(run_id, head, conclusion), self.main, run_id + 5000)
        runner.run(COMMENT)
        return runner


def _md5_in(repo: Path) -> str:
    """The md5 of the project's (tiny) archive: what CIFAR10_MD5, the official archive's, is on GitHub."""
    return load_params(repo / "params.yaml").data.sources[0].md5


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_archive) -> Project:
    project = Project(tmp_path_factory.mktemp("workflow"), tiny_archive)
    origin = project.origin
    run(["git", "checkout", "-qb", "patch-1"], origin)
    set_params(origin / "params.yaml", {"strategy": 2})
    # The pull request also rewrites the posting script: the posting workflow must never run it.
    (origin / "tools/post_report.py").write_text(
        f"from pathlib import Path\nPath({str(project.root / 'pwned')!r}).touch()\n")
    project.head = commit(origin, "pull request: strategy 2")
    run(["git", "checkout", "-q", project.main], origin)
    return project


@pytest.fixture(scope="module")
def rehearsal(project) -> Rehearsal:
    """pr-report.yml on the pull request, then pr-comment.yml on its completion."""
    report = project.report("report", project.main, project.head)
    assert not report.failed(), _log(report)
    comment = project.comment("comment", report.run_id, project.head)
    return Rehearsal(report, comment, project.records())


def _log(runner: Runner) -> str:
    return "\n".join(f"--- {step.name}: {step.outcome} ({step.seconds:.1f} s)\n"
                     f"{step.stdout[-3000:]}\n{step.stderr[-3000:]}" for step in runner.steps)


def artifact_of(runner: Runner) -> Path:
    return runner.artifacts / str(runner.run_id) / "pr-report"


def section_of(report: str, section: str) -> str:
    return report.split(f"### {section}\n", 1)[1].split("\n###", 1)[0]


def table(text: str) -> list[list[str]]:
    """The first Markdown table in `text`: its rows, header first, separator dropped."""
    rows = []
    for line in text.split("<details>", 1)[0].splitlines():
        if line.startswith("|") and not set(line) <= set("|- "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def shown(value: object) -> str:
    return str(round(value, 5) if isinstance(value, float) else value)


def metrics_at(workspace: Path, revision: str) -> dict:
    return json.loads(run(["git", "show", f"{revision}:metrics/finetune.json"], workspace).stdout)


def test_the_artifact_holds_the_report_the_plots_and_the_number(rehearsal):
    artifact = artifact_of(rehearsal.report)
    assert (artifact / "pr-number").read_text() == f"{NUMBER}\n"
    report = (artifact / "report.md").read_text()
    assert report.startswith("## Pipeline report: `ci-head` against `ci-base`")
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert images and all((artifact / image).is_file() for image in images)  # the PNGs the report shows
    assert any(image.startswith("report_plots/") and image.endswith(".png") for image in images)
    assert (artifact / "plots-html/index.html").is_file()  # the interactive `dvc plots diff`


def test_the_headline_shows_base_and_pull_request_from_their_own_runs(rehearsal):
    workspace = rehearsal.report.workspace
    report = (artifact_of(rehearsal.report) / "report.md").read_text()
    base, head = metrics_at(workspace, "ci-base"), metrics_at(workspace, "ci-head")
    # The two runs are of the two commits, each in the profile: strategy 1 on the base, 2 in the pull request.
    for revision, strategy in (("ci-base", 1), ("ci-head", 2)):
        params = yaml.safe_load(run(["git", "show", f"{revision}:params.yaml"], workspace).stdout)
        assert (params["strategy"], params["finetune"]["epochs"]) == (strategy, 1)
    rows = {(row[0], row[1]): row[2:] for row in table(section_of(report, "Metrics"))[1:]}
    assert table(section_of(report, "Metrics"))[0] == ["Path", "Metric", "ci-base", "ci-head", "Change"]
    assert base["trainable_params"] != head["trainable_params"]
    for metric, value in (("test.accuracy", lambda m: m["test"]["accuracy"]),
                          ("test.macro_f1", lambda m: m["test"]["macro_f1"]),
                          ("trainable_params", lambda m: m["trainable_params"])):
        assert rows["metrics/finetune.json", metric][:2] == [shown(value(base)), shown(value(head))], metric
    params = table(section_of(report, "Params"))
    assert ["params.yaml", "strategy", "1", "2"] in params


def test_the_posting_workflow_posts_that_report_to_the_pull_request(rehearsal, project):
    [record] = rehearsal.records
    report = artifact_of(rehearsal.report) / "report.md"
    assert record["args"][:4] == ["comment", "update", f"--target=pr/{NUMBER}", "--watermark-title=Pipeline report"]
    [(posted, text)] = record["files"].items()
    assert Path(posted).name == "report.md" and text == report.read_text()
    assert record["env"] == {"ITERATIVE_DO_NOT_TRACK": "1", "REPO_TOKEN": "test-token"}
    # It ran the default branch's tools/post_report.py, not the pull request's rewrite of it.
    assert not (project.root / "pwned").exists()
    assert run(["git", "rev-parse", "HEAD"], rehearsal.comment.workspace).stdout.strip() == project.main


@pytest.mark.parametrize("broken", ["number", "size"])
def test_a_bad_number_or_an_oversized_report_is_refused_and_nothing_posted(rehearsal, project, broken):
    run_id = REPORT_RUN_ID + 100 + len(broken)
    artifact = project.artifacts / str(run_id) / "pr-report"
    shutil.copytree(artifact_of(rehearsal.report), artifact)
    if broken == "number":
        (artifact / "pr-number").write_text("12; rm -rf /\n")
    else:
        (artifact / "report.md").write_text("x" * 65_537)
    before = len(project.records())
    comment = project.comment(f"refused-{broken}", run_id, project.head)
    post = comment.steps[-1]
    assert post.outcome == "failure"
    [line] = post.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("not a pull-request number" if broken == "number" else "65,536") in line
    assert len(project.records()) == before


def test_a_failed_report_run_gets_a_comment_linking_its_log(project):
    run_id = REPORT_RUN_ID + 200
    artifact = project.artifacts / str(run_id) / "pr-report"
    artifact.mkdir(parents=True)
    (artifact / "pr-number").write_text(f"{NUMBER}\n")  # all that a run failing early uploads
    before = len(project.records())
    comment = project.comment("failed-run", run_id, project.head, conclusion="failure")
    assert not comment.failed(), _log(comment)
    [record] = project.records()[before:]
    assert f"--target=pr/{NUMBER}" in record["args"]
    [text] = record["files"].values()
    assert "failure" in text and f"https://github.com/owner/cifar10-transfer/actions/runs/{run_id}" in text


def test_a_base_that_fails_in_the_profile_is_compared_by_its_committed_metrics(rehearsal, project):
    origin = project.origin
    committed = {"test": {"accuracy": 0.125, "macro_f1": 0.0625}, "trainable_params": 12345}
    run(["git", "checkout", "-qb", "main-2", project.main], origin)
    (origin / "metrics").mkdir(exist_ok=True)
    (origin / "metrics/finetune.json").write_text(json.dumps(committed))
    # A count small_cnn's base does not have: every stage refuses it, as the GPU reference's counts would.
    set_params(origin / "params.yaml", {"strategies.3.frozen_base_layers": 249})
    base = commit(origin, "base: metrics of another profile; strategy 3 for InceptionV3")
    set_params(origin / "params.yaml", {"strategies.3.frozen_base_layers": 3, "strategy": 2})
    head = commit(origin, "pull request on it: the same parameters as the first one")
    runner = project.report("failing-base", base, head)
    assert not runner.failed(), _log(runner)
    report = (artifact_of(runner) / "report.md").read_text()
    assert report.startswith("> [!WARNING]\n> The base commit") and "did not run in the CI profile" in report
    rows = table(section_of(report, "Metrics"))
    assert rows[0] == ["Path", "Metric", base, "ci-head", "Change"]
    values = {row[1]: row[2:4] for row in rows[1:] if row[0] == "metrics/finetune.json"}
    head_metrics = metrics_at(runner.workspace, "ci-head")
    assert values["test.accuracy"] == ["0.125", shown(head_metrics["test"]["accuracy"])]
    assert values["trainable_params"] == ["12345", shown(head_metrics["trainable_params"])]


def test_the_report_workflow_has_a_read_only_token_and_the_posting_one_never_runs_the_pull_request():
    report, comment = workflow(REPORT), workflow(COMMENT)
    assert "pull_request" in report[True] and report["permissions"] == {"contents": "read"}  # `on` reads as true
    checkout = report["jobs"]["report"]["steps"][1]
    assert checkout["uses"].startswith("actions/checkout@") and checkout["with"]["fetch-depth"] == 0
    assert checkout["with"]["persist-credentials"] is False  # the PR's own code must not read a token
    assert comment[True]["workflow_run"] == {"workflows": [report["name"]], "types": ["completed"]}
    [job] = comment["jobs"].values()
    assert job["permissions"]["pull-requests"] == "write"
    assert all("ref" not in step.get("with", {}) for step in job["steps"])  # the default branch only
    assert job["env"]["ITERATIVE_DO_NOT_TRACK"] == "1"


def test_every_action_is_pinned_to_a_commit():
    for path in (REPORT, COMMENT, TESTS):
        for line in re.findall(r"uses: (\S+.*)", path.read_text()):
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}  # v\d+", line), (path.name, line)


def test_the_test_workflow_runs_ci_run_on_push_and_pull_request():
    parsed = workflow(TESTS)
    assert set(parsed[True]) == {"push", "pull_request"}
    assert [step["run"] for step in parsed["jobs"]["tests"]["steps"] if "run" in step] == ["bash .ci/run"]


def test_every_module_and_file_it_names_exists():
    text = "\n".join(step.get("run", "") for path in (REPORT, COMMENT)
                     for job in workflow(path)["jobs"].values() for step in job["steps"])
    modules = re.findall(r"python3? -m ([\w.]+)", text)
    assert {"tools.report", "tools.post_report", "stages.download"} <= set(modules)
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    assert (ROOT / workflow(REPORT)["env"]["PIPELINE_PROFILE"]).is_file()
    assert workflow(REPORT)["env"]["CIFAR10_MD5"] in (ROOT / "params.yaml").read_text()  # the official archive's
    assert 'pip install -e ".[dev,cpu]"' in text


def test_ci_runs_the_cpu_profile_whose_sources_reach_the_official_url(tmp_path):
    """A runner has no ../shared: the CPU profile leaves data.sources alone, whose last is the official URL."""
    assert workflow(REPORT)["env"]["PIPELINE_PROFILE"] == "profiles/cpu.args"
    cpu = shlex.split((ROOT / "profiles/cpu.args").read_text())
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    apply_overrides(params_file, cpu[1::2])  # as `dvc exp run -S` applies them (Hydra syntax, not YAML)
    params = load_params(params_file)
    assert params.model.backbone == "small_cnn" and params.data.sources[-1].url.startswith("https://")


def test_both_runs_read_the_archive_the_workflow_fetched(rehearsal):
    """The archive the workflow keeps (cached on GitHub, keyed on its md5) is both runs' one data source."""
    archive = rehearsal.report.temp / "cifar10/cifar-10-python.tar.gz"
    assert archive.is_file()
    for revision in ("ci-base", "ci-head"):
        record = json.loads(run(["git", "show", f"{revision}:metrics/download.json"],
                                rehearsal.report.workspace).stdout)
        assert record == {"source": 0, "url": str(archive),
                          "md5": rehearsal.report.contexts["env"]["CIFAR10_MD5"]}, revision
