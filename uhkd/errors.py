"""The exceptions the command lines print as one line: bad user input (exit 2) and work that failed (exit 1)."""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable, NoReturn


class UserError(ValueError):
    """Bad input from the user (a name, a value, a file). Its message is one complete line."""


class RunFailed(RuntimeError):
    """Work that ran and failed as a whole (the teachers a sweep needs did not train): one line, exit 1."""


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
    input: argparse's own prints its usage block first. An unknown flag is named with the likely one: a flag of
    this command that it begins or resembles, else `hints[flag]` (what another command's flag is called here, e.g.
    `--student` of `uhkd.train` is `--pairs TEACHER:STUDENT` of a sweep)."""

    def __init__(self, *args, hints: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hints = dict(hints or {})

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = self._unknown(message[len(prefix):].split(" "))
        self.exit(2, f"error: {message} (see --help)\n")

    def likely_flag(self, flag: str) -> str:
        """The flag of this command most likely meant by the unknown `flag`, "" when none looks like it."""
        own = [o for o in self._option_string_actions if o.startswith("--")]
        longer = sorted((o for o in own if o.startswith(flag)), key=len)
        if longer:
            return " or ".join(longer[:3])
        if flag in self.hints:
            return self.hints[flag]
        return " or ".join(difflib.get_close_matches(flag, own, n=2, cutoff=0.75))

    def _unknown(self, tokens: list[str]) -> str:
        flags = [t.split("=", 1)[0] for t in tokens if t.startswith("-") and len(t) > 1]
        if not flags:
            return f"unexpected argument{'s' * (len(tokens) > 1)} {' '.join(map(repr, tokens))}"
        named = []
        for flag in dict.fromkeys(flags):
            likely = self.likely_flag(flag)
            named.append(f"{flag} (did you mean {likely}?)" if likely else flag)
        return f"unknown flag{'s' * (len(named) > 1)} {', '.join(named)}"
