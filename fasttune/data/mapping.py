"""``data.mapping``: build rows of a known shape from any columns, declared in the recipe.

Each key of the mapping is a column of the row to build; each value is a template in which
``{Column}`` is replaced by that column of the source row (``{{`` and ``}}`` are literal braces).
Only the template is parsed: braces inside the data are copied as they are. Two forms::

    mapping:                       # a conversation: system (optional), user, assistant
      system: "You are a careful physician."
      user: "{Question}"
      assistant: "<think>{Complex_CoT}</think>{Response}"

    mapping:                       # the columns of a shape (see formats.SHAPES)
      prompt: "{question}"
      completion: "{answer}"

A template that is exactly ``{column}`` copies that column's value as it is, so
``messages: "{dialog}"`` renames a column that already holds a list of messages.
"""
from __future__ import annotations

import string
import typing

from fasttune.data.formats import SHAPES, BadRow, detect_shape
from fasttune.errors import Problem, UserError, suggest

TURNS = ("system", "user", "assistant")
COLUMNS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text")


class Template(typing.NamedTuple):
    parts: tuple[tuple[str, typing.Optional[str]], ...]
    """(literal text, column name or None) pairs, in order."""

    @property
    def columns(self) -> list[str]:
        return [column for _, column in self.parts if column is not None]

    def render(self, row: dict) -> object:
        if len(self.parts) == 1 and self.parts[0][0] == "" and self.parts[0][1] is not None:
            column = self.parts[0][1]
            if column not in row:
                raise BadRow(f"column `{column}` is missing", f"add `{column}` to those rows")
            return row[column]  # a plain rename keeps lists (messages) as they are
        out = []
        for literal, column in self.parts:
            out.append(literal)
            if column is not None:
                if column not in row:
                    raise BadRow(f"column `{column}` is missing", f"add `{column}` to those rows")
                value = row[column]
                out.append("" if value is None else str(value))
        return "".join(out)


def _template_text(value: object) -> object:
    # YAML reads an unquoted {Question} as the mapping {"Question": None}; it can only mean the column.
    if isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
        return "{" + str(next(iter(value))) + "}"
    return value


def parse_template(text: str) -> Template:
    """``ValueError`` for a template that is not plain text with ``{column}`` fields."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(text):
        if field is not None and (not field.strip() or spec or conversion):
            raise ValueError(f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not a column "
                             "reference (write {ColumnName}; double literal braces: {{ }})")
        parts.append((literal, field))
    return Template(tuple(parts) or (("", None),))


def compile_mapping(mapping: dict) -> tuple[dict[str, Template], list[Problem]]:
    """The parsed templates, and every problem with the mapping (``data.mapping.<key>``)."""
    templates, problems = {}, []
    keys = set(mapping) & {*TURNS, *COLUMNS}
    for key, value in mapping.items():
        where = f"data.mapping.{key}"
        value = _template_text(value)
        if key not in (*TURNS, *COLUMNS):
            problems.append(Problem(where, value, f"is not a column fasttune builds (keys: {', '.join((*TURNS, *COLUMNS))})",
                                    suggest(str(key), (*TURNS, *COLUMNS)) or "use system/user/assistant, or the columns of one shape"))
            continue
        if not isinstance(value, str):
            problems.append(Problem(where, value, "must be a text template such as \"{Question}\"", "quote the template"))
            continue
        try:
            templates[key] = parse_template(value)
        except ValueError as err:
            problems.append(Problem(where, value, str(err), "reference columns as {ColumnName}"))
    turns = keys & set(TURNS)
    if turns:
        if keys - set(TURNS):
            problems.append(Problem("data.mapping", sorted(keys), "mixes conversation turns (system/user/assistant) with other columns",
                                    "use either system/user/assistant, or the columns of one shape"))
        for needed in ("user", "assistant"):
            if needed not in keys:
                problems.append(Problem(f"data.mapping.{needed}", None, "a conversation mapping needs a user and an assistant template",
                                        f"add {needed}: \"{{YourColumn}}\""))
    elif keys and not problems and detect_shape(keys) is None:
        problems.append(Problem("data.mapping", sorted(keys), f"does not build a known shape ({SHAPES})",
                                "use user/assistant, prompt/completion, or text"))
    if not mapping:
        problems.append(Problem("data.mapping", mapping, "is empty", "remove it, or map user/assistant to templates"))
    return templates, problems


def output_columns(templates: dict[str, Template]) -> set[str]:
    """The columns of the rows the mapping builds."""
    return {"messages"} if set(templates) & set(TURNS) else set(templates)


def check_columns(templates: dict[str, Template], columns: typing.Iterable[str], source: str) -> None:
    """``UserError`` naming each template column that no row of ``source`` has."""
    columns = list(columns)
    problems = []
    for key, template in templates.items():
        for column in template.columns:
            if column not in columns:
                problems.append(Problem(f"data.mapping.{key}", "{" + column + "}",
                                        f"column `{column}` is not in {source} (columns: {', '.join(columns)})",
                                        suggest(column, columns) or "use one of the data's columns"))
    if problems:
        raise UserError(problems, "data.mapping does not fit the data")


def map_row(row: dict, templates: dict[str, Template]) -> dict:
    """The row the mapping builds from one source row; :class:`BadRow` for a missing column."""
    values = {key: template.render(row) for key, template in templates.items()}
    if not set(values) & set(TURNS):
        return values
    # An empty system template (a blank column) means "no system turn", not a bad row.
    messages = [{"role": role, "content": values[role]} for role in TURNS
                if role in values and (role != "system" or (isinstance(values[role], str) and values[role].strip()))]
    return {"messages": messages}
