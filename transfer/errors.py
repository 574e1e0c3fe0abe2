"""One exception for every refusal the pipeline explains to the user."""

from __future__ import annotations

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem the user can fix; its message is one line that names the file or key."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit code 1."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was recorded as done, rerun `dvc repro`", file=sys.stderr)
        raise SystemExit(130) from None
