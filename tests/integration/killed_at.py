"""`python -m refusal_lab ARGS` that SIGKILLs itself at a chosen point of its own code (for test_resume_stages).

    python tests/integration/killed_at.py log 'circuits validation' 2 ARGS...
    python tests/integration/killed_at.py commit set.json 1 ARGS...

`log PATTERN N`: at the N-th log record whose message contains PATTERN, right after it is written.
`commit NAME N`: right after the N-th `os.replace` onto a file named NAME, i.e. just after an atomic
write committed it (refusal_lab.fingerprint.write_json_atomic, the judge's codes, the report page).

The process kills itself, so the moment is exact and the test is not a race against a poll loop;
SIGKILL leaves no chance to clean up, like the OOM killer or a preempted SLURM node.
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys
from pathlib import Path


def main() -> None:
    kind, pattern, nth, *args = sys.argv[1:]
    seen = 0

    def hit() -> None:
        nonlocal seen
        seen += 1
        if seen == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "log":
        real_handle = logging.Logger.handle

        def handle(self: logging.Logger, record: logging.LogRecord) -> None:
            real_handle(self, record)  # the line reaches the log file first
            if pattern in record.getMessage():
                hit()

        logging.Logger.handle = handle  # type: ignore[method-assign]
    elif kind == "commit":
        real_replace = os.replace

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: object) -> None:
            real_replace(src, dst, **kwargs)  # type: ignore[arg-type]
            if Path(dst).name == pattern:
                hit()

        os.replace = replace  # type: ignore[assignment]
    else:
        raise SystemExit(f"kind: {kind!r}; valid: log, commit")
    sys.argv = ["refusal_lab", *args]
    runpy.run_module("refusal_lab", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
