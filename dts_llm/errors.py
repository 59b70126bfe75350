"""Errors the user can fix, reported by the commands in one line instead of a traceback.

A `UserError` is raised by code that checks the user's input (command line, recipe, data, paths);
`user_errors` turns the given kinds of error raised while such input is read into one. Anything
else keeps its traceback: it is a bug to report, not a setting to change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager


class UserError(ValueError):
    """A mistake in the command, recipe, data or paths; its message says what to change."""


@contextmanager
def user_errors(*kinds: type[BaseException]):
    """Inside, errors of ``kinds`` become UserErrors with their message."""
    try:
        yield
    except UserError:
        raise
    except kinds as error:
        raise UserError(str(error)) from error


def exit_status(prog: str, command: Callable[[], object]) -> int:
    """Run ``command``: 0, or 2 after printing ``prog: error: ...`` (one line) when it raises a UserError."""
    try:
        command()
    except UserError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0
