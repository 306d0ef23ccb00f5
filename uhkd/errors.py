"""The one exception type for bad user input: the command lines print it as one line and exit 2."""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable, NoReturn


class UserError(ValueError):
    """Bad input from the user (a name, a value, a file). Its message is one complete line."""


def did_you_mean(value: object, choices: Iterable[object]) -> str:
    """` (did you mean a or b?)` for the choices that look like `value`, else ""."""
    value, choices = str(value), [str(c) for c in choices]
    longer = sorted((c for c in choices if c.startswith(value) or c.endswith(f".{value}")), key=len)
    close = longer[:3] or difflib.get_close_matches(value, choices, n=3)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def choice_error(what: str, value: object, choices: Iterable[object], listed: Iterable[object] | None = None,
                 ) -> UserError:
    """`unknown <what> 'value' (did you mean a?); valid choices: a, b, c`; `listed`, when given, is the part of
    a long list of choices worth showing."""
    choices = [str(c) for c in choices]
    shown = ", ".join(sorted(str(c) for c in (choices if listed is None else listed)))
    return UserError(f"unknown {what} {value!r}{did_you_mean(value, choices)}; valid choices: {shown}")


def one_line(text: object, limit: int = 500) -> str:
    """The first non-blank line of `text` (an exception's message, a traceback's summary), at most `limit` long."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors (an unknown flag, `--epochs 2.5`) are one line, exit 2, like every other bad
    input: argparse's own prints its usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")
