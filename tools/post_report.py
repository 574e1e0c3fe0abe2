"""Post the pull-request report that .github/workflows/pr-report.yml left in its artifact.

    python -m tools.post_report ARTIFACT_DIR --conclusion CONCLUSION --run-url URL

Run by .github/workflows/pr-comment.yml, which holds a write token and so must never run the pull
request's code: this script reads the artifact as data. The artifact's `pr-number` must be a plain
integer and its `report.md` at most GitHub's comment limit, or nothing is posted. A successful report run
posts report.md (`cml comment update`: the one comment with the watermark, created or updated); a failed
one posts a short comment with a link to its log; a cancelled one (superseded by a newer push) posts nothing.
Standard library only: the posting workflow does not install the project.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from transfer.errors import PipelineError, run_stage

COMMENT_LIMIT = 65_536  # characters in one GitHub comment
WATERMARK = "Pipeline report"
NUMBER = re.compile(r"[1-9][0-9]{0,9}")
FAILED = ("failure", "timed_out")  # other conclusions (cancelled, skipped) are no news for the pull request


def pull_request_number(artifact: Path) -> int:
    """The number in the artifact's pr-number file, refused unless it is a plain positive integer."""
    path = artifact / "pr-number"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; the report run did not say which pull request it was for")
    text = path.read_text(errors="replace").strip()
    if not NUMBER.fullmatch(text):
        raise PipelineError(f"{path}: {text[:40]!r} is not a pull-request number; nothing posted")
    return int(text)


def report_of(artifact: Path) -> Path:
    """The artifact's report.md, refused if it is missing or longer than a GitHub comment."""
    path = artifact / "report.md"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; nothing posted")
    length = len(path.read_text(errors="replace"))
    if length > COMMENT_LIMIT:
        raise PipelineError(f"{path}: {length:,} characters, over GitHub's comment limit of {COMMENT_LIMIT:,}; "
                            "nothing posted")
    return path


def failure_note(conclusion: str, run_url: str) -> str:
    return (f"## {WATERMARK}\n\nThe report run for this pull request ended with **{conclusion}**, so there is "
            f"no report for this push. See [its log]({run_url}).\n")


def post(number: int, markdown: Path) -> None:
    """Create or update the pull request's one report comment (images next to the file are uploaded)."""
    # Run where the workflow runs it (its checkout: cml reads the repository from git and the CI
    # environment); cml finds the images the report links relative to the report file.
    command = ["cml", "comment", "update", f"--target=pr/{number}", f"--watermark-title={WATERMARK}",
               str(markdown.resolve())]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise PipelineError(f"`cml comment update` failed for pull request {number}: {lines[-1]}")
    print(f"post_report: {markdown.name} posted to pull request {number}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="folder of the downloaded pr-report artifact")
    parser.add_argument("--conclusion", required=True, help="the report run's conclusion (success, failure, ...)")
    parser.add_argument("--run-url", required=True, help="the report run's page, linked from a failure comment")
    arguments = parser.parse_args()
    number = pull_request_number(arguments.artifact)
    if arguments.conclusion == "success":
        post(number, report_of(arguments.artifact))
    elif arguments.conclusion in FAILED:
        note = arguments.artifact / "failure.md"
        note.write_text(failure_note(arguments.conclusion, arguments.run_url))
        post(number, note)
    else:
        print(f"post_report: the report run ended {arguments.conclusion}; nothing posted")


if __name__ == "__main__":
    run_stage(main)
