"""User mistakes, reported in the user's words: the thing, the value, the rule and the fix.

A :class:`UserError` carries every problem found, so a recipe with three typos is reported once
with three lines, not three runs. The CLI prints it and exits with code 2, without a traceback.
"""
from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass

EXIT_USER_ERROR = 2


def suggest(word: str, candidates: typing.Iterable[str], cutoff: float = 0.6) -> str:
    """``did you mean `x`?`` for the candidate closest to ``word``, or ``""`` when none is close:
    every "did you mean" fasttune prints comes from here."""
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=cutoff)
    return f"did you mean `{close[0]}`?" if close else ""


@dataclass(frozen=True)
class Problem:
    """One thing the user must change."""

    where: str
    """What is wrong: a dotted recipe key (``train.learning_rate``), a file, or a command word."""
    value: object
    """The value found (``None`` when the thing is missing)."""
    rule: str
    """What a valid value looks like."""
    fix: str
    """What to do about it, concretely."""

    def render(self) -> str:
        shown = "(missing)" if self.value is None else repr(self.value)
        return f"{self.where} = {shown}: {self.rule}\n    fix: {self.fix}"


class UserError(Exception):
    """One or more problems caused by the user's recipe, data, command line or machine."""

    def __init__(self, problems: Problem | list[Problem], title: str = "cannot run this"):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{self.title}: {count} problem{'s' if count > 1 else ''}"
        return "\n".join([head, *(f"  - {p.render()}" for p in self.problems)])


class SourceUnavailable(Exception):
    """Something the run needs cannot be reached from this machine (a hub dataset while offline,
    not cached): not a typo, but the user must still act. The CLI prints it and exits with 2;
    ``--dry-run`` lists it as not checked."""
