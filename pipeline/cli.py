"""What every job's command line shares: one-line errors for user mistakes, exit codes.

    if __name__ == "__main__":
        sys.exit(run_job(main))

A user mistake (a path that does not exist, a file that is not what it should be, a
checkpoint of another preset, a bad option value) ends with one line on stderr and exit
code 2; `--verbose` adds the traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from distilpose.errors import UserError
from distilpose.fileio import TransientIOError

USAGE_ERROR = 2  # argparse's exit code for a bad command line
STORAGE_UNAVAILABLE = 75  # os.EX_TEMPFAIL: a transient failure; the same command, rerun, resumes


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong", never "the code is wrong"."""
    from distilpose.data.coco import DataError
    from distilpose.models.checkpoints import CheckpointError
    from pipeline.cache.schema import CacheMismatchError

    # FileNotFoundError: every path a job opens is one the user gave (or one derived from it).
    # TransientIOError is not the user's mistake, but it has the same one-line treatment.
    return (UserError, DataError, CheckpointError, CacheMismatchError, FileNotFoundError, TransientIOError)


class JobParser(argparse.ArgumentParser):
    """An ArgumentParser with `--verbose` whose errors are one line (argparse prints the
    usage first)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--verbose", action="store_true", help="tracebacks of errors, Ray's own log lines and progress bars"
        )

    def error(self, message: str) -> None:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def run_job(main: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run a job's main(); a user mistake becomes one stderr line and exit code 2, storage
    that stayed unavailable through its retries one line and exit code 75 (EX_TEMPFAIL:
    rerun the same command), wherever in Ray it happened."""
    from pipeline.storage import failure_cause

    argv = sys.argv[1:] if argv is None else argv
    try:
        return main()
    except Exception as e:
        cause = failure_cause(e, user_error_types())
        if cause is None:
            raise
        if "--verbose" in argv:
            traceback.print_exc()
        print(f"error: {one_line(str(cause)) or type(cause).__name__}", file=sys.stderr)
        return STORAGE_UNAVAILABLE if isinstance(cause, TransientIOError) else USAGE_ERROR


def one_line(message: str) -> str:
    """A message's lines (a list of differences, a hint) joined into one."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
