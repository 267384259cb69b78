"""What happened to the rows: how many were read and kept, and which were bad, grouped by kind.

``data.on_bad_row: error`` turns the bad rows into one :class:`UserError` that lists every kind;
``skip`` drops them and the report keeps the counts. Later stages (tokenization) add their own
kinds with :meth:`DataReport.drop`.
"""
from __future__ import annotations

import bisect
import typing
from dataclasses import dataclass, field

from fasttune.errors import Problem, UserError

SHOWN_ROWS = 3


@dataclass(frozen=True)
class BadRows(Problem):
    """Every row wrong the same way: ``value`` is how many, ``rows`` the first few, as the user counts them."""

    rows: tuple[str, ...] = ()

    def render(self) -> str:
        count = self.value
        return (f"{self.where}: {count} row{'s' if count != 1 else ''}: {self.rule} (first: {', '.join(self.rows)})"
                f"\n    fix: {self.fix}")


@dataclass
class DataReport:
    """Counts for one ``data.path`` (or ``data.eval_path``); row numbers are 1-based over all its sources in order."""

    source: str
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)
    """Kind of problem → row numbers dropped (or, before ``on_bad_row`` applies, found bad)."""
    fixes: dict[str, str] = field(default_factory=dict)
    """Kind → what the user can do about it."""
    files: list[tuple[str, int]] = field(default_factory=list)
    """(source, number of its first row) for each source, in order."""
    notes: list[str] = field(default_factory=list)
    """What else the user should know about these rows (``data.max_rows`` leaving some out)."""

    def add_file(self, name: str) -> None:
        self.files.append((name, self.rows_read + 1))

    def drop(self, kind: str, row: int, fix: str = "fix those rows") -> None:
        """Record a bad row; the caller leaves it out."""
        self.skipped.setdefault(kind, []).append(row)
        self.fixes.setdefault(kind, fix)
        self.rows_kept -= 1

    @property
    def rows_skipped(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())

    def locate(self, row: int) -> str:
        """``row 3`` for one source; ``b.jsonl row 3`` (counted within that file) for several."""
        if len(self.files) <= 1:
            return f"row {row}"
        index = bisect.bisect_right([start for _, start in self.files], row) - 1
        name, start = self.files[max(index, 0)]
        return f"{name} row {row - start + 1}"

    def problems(self) -> list[Problem]:
        return [BadRows(self.source, len(rows), kind, self.fixes.get(kind, "fix those rows"), self._labels(rows[:SHOWN_ROWS]))
                for kind, rows in sorted(self.skipped.items(), key=lambda item: item[1][0])]

    def _labels(self, rows: list[int]) -> tuple[str, ...]:
        if len(self.files) <= 1:  # "row 3, 17, 40"
            return (f"row {rows[0]}", *map(str, rows[1:]))
        return tuple(self.locate(r) for r in rows)

    def lines(self) -> list[str]:
        """One line per kind of dropped row, then the notes, for a run's log."""
        return [*(f"{self.source}: skipped {p.value} row{'s' if p.value != 1 else ''}: {p.rule} (first: {', '.join(p.rows)})"
                  for p in self.problems()), *(f"{self.source}: {note}" for note in self.notes)]

    def apply_policy(self, on_bad_row: typing.Literal["error", "skip"]) -> None:
        """``UserError`` listing every kind of bad row (``error``), or when ``skip`` left nothing."""
        if not self.skipped:
            return
        if on_bad_row == "error":
            raise UserError(self.problems(), f"{self.rows_skipped} of {self.rows_read} rows in {self.source} are not usable")
        if self.rows_kept <= 0:
            raise UserError(self.problems(), f"every row of {self.source} was dropped (data.on_bad_row=skip)")
