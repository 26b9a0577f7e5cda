"""User-facing errors: one line, naming the file / key / value and what was expected.

Every entry point (the jobs) catches `UserError` and prints `error: <message>` with no traceback, so that a
user sees what to fix instead of a stack dump. Internal bugs still raise normally.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """Bad input from the user: a config, a data file, a model or SAE folder. The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A config key, type or value is wrong."""


class DataError(UserError):
    """A data file is missing, malformed or empty."""


class CheckpointError(UserError):
    """A run directory or saved artifact cannot be used."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the house's error format: an unknown flag or a bad choice is one `error: ...` line on stderr
    and exit 2 (argparse's own prints the usage block and `prog: error:` first)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names task, step and term."""


def exit_on_user_error(main: F) -> F:
    """Decorate a job's main(): a UserError becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, NonFiniteLossError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
