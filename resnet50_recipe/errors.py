"""The one error type for bad input, and every exit status, named once.

`UserError` is what a user can fix: a recipe key, a path, a flag, a bucket name. The CLI alone turns it into one
line on stderr and exit 2 (`EXIT_BAD_INPUT`); any other exception is a bug and keeps its traceback (exit 1).
It subclasses ValueError, so code that catches a ValueError from a parser still catches it.

The exit statuses are read by the CLI, by the systemd unit in resnet50_recipe/cloud/user-data.sh (as numbers,
with a comment naming these constants) and by docs/exit-codes.md.
"""

from __future__ import annotations

__all__ = ["UserError", "RecipeError", "MissingInput", "ExistingOutput", "EXIT_FINISHED", "EXIT_BUG",
           "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_PUBLISH_FAILED", "EXIT_BUDGET", "EXIT_INCOMPLETE",
           "EXIT_PREEMPTED", "EXIT_INTERRUPTED"]


class UserError(ValueError):
    """Bad input: the message names the file, key or value and what would be valid."""


class RecipeError(UserError):
    """A recipe that cannot run: unknown key, wrong type, value out of range, missing file."""


# Bad input that is also the OSError a caller may already catch: `except FileNotFoundError` and
# `pytest.raises(FileExistsError)` still match, and the CLI still reads it as a UserError.
class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named, or one it must hold, is not there."""


class ExistingOutput(UserError, FileExistsError):
    """The output the user named already holds something this command will not replace without being told."""


# The systemd unit restarts on 74 and 75 only: nothing else is fixed by starting again.
EXIT_FINISHED = 0
EXIT_BUG = 1  # an exception that is not a UserError (a bug, or a full disk): the traceback says where
EXIT_FAILED = 1  # a command's own "no", in one line: `data verify` left problems to fix, AWS refused an `aws` command
EXIT_BAD_INPUT = 2
EXIT_PUBLISH_FAILED = 3  # trained, complete and synced; the export or the Hub push failed: retry those by hand
EXIT_BUDGET = 4  # stopped with a checkpoint, complete and synced, because train.budget_usd would be passed
EXIT_INCOMPLETE = 74  # EX_IOERR: a checkpoint or the run's files did not reach disk or S3 before the deadline
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a supervisor restarts on it, unlike 0 or 1
EXIT_INTERRUPTED = 130  # a second Ctrl-C: 128 + SIGINT, as a shell reports it
