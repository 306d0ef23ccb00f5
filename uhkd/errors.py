"""The one exception type for bad user input: the command lines print it as one line and exit 2."""
from __future__ import annotations

from typing import Iterable


class UserError(ValueError):
    """Bad input from the user (a name, a value, a file). Its message is one complete line."""


def choice_error(what: str, value: object, choices: Iterable[object]) -> UserError:
    """`unknown <what> 'value'; valid choices: a, b, c`."""
    listed = ", ".join(str(c) for c in sorted(choices, key=str))
    return UserError(f"unknown {what} {value!r}; valid choices: {listed}")


def one_line(text: object, limit: int = 500) -> str:
    """The first non-blank line of `text` (an exception's message, a traceback's summary), at most `limit` long."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]
