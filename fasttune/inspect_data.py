"""``fasttune data inspect``: what the model will learn from a data source, without loading weights.

The rows, the tokenizer and its training template, and the tokens with their labels all come from
fasttune.prepare, exactly as a run makes them (the run trains on these very tokens); this module
picks a few examples and renders them with the trained tokens highlighted.
"""
from __future__ import annotations

from fasttune import machine
from fasttune.config import Recipe
from fasttune.data.rows import read_data
from fasttune.data.tokenize import IGNORE, truncate
from fasttune.errors import Problem, UserError
from fasttune.model.source import tokenizer_source
from fasttune.prepare import inputs, plan_machine, prepare_elsewhere


def _tokenizer_source(recipe: Recipe) -> str:
    source = tokenizer_source(recipe.model.name)
    if source is None:
        raise UserError(Problem("model.name", recipe.model.name, "is a GGUF file that has not been converted yet (inspect reads tokenizers only)",
                                f"convert it once by running the recipe: python -m fasttune recipe {recipe.name}"))
    return source


def inspect_data(recipe: Recipe, count: int = 3) -> dict:
    """The inspect document: format, rows, stats and ``count`` examples (see the CLI's --json)."""
    import datasets

    datasets.disable_progress_bars()
    prepared = prepare_elsewhere(recipe, plan_machine(recipe, machine.detect()))
    rows = read_data(recipe, prepared.hooks.formatting_func)  # the data's own problems first: they are what inspect is asked about
    source = _tokenizer_source(recipe)
    made = inputs(prepared, source, rows)
    rules, tokenizer, data = made.train.rules, made.tokenizer, made.data
    examples = []
    for row in made.train.dataset.select(range(min(count, len(made.train.dataset)))):
        ids = truncate(row["input_ids"], rules.max_length, rules.truncation_mode)
        labels = truncate(row["labels"], rules.max_length, rules.truncation_mode)
        examples.append({"input_ids": ids, "labels": labels, "text": tokenizer.decode(ids),
                         "trained_text": tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE]),
                         "pieces": _pieces(ids, labels, tokenizer)})
    notes = [note for report_ in data.reports() for note in report_.notes]
    return {"format": data.format, "shape": made.train.shape, "rows": len(data.train),
            "eval_rows": data.eval_rows,
            "eval_sets": {name: len(set_rows) for name, set_rows in data.eval_sets.items()},
            "source": data.source, "tokenizer": source, "notes": notes, "stats": made.stats.to_dict(), "examples": examples}


def _pieces(ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) runs; each run's text is the difference of decoded prefixes, so a
    SentencePiece space or a multi-token character is never lost at a run boundary."""
    pieces, start, before = [], 0, ""
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[:end])
            pieces.append((text[len(before):], labels[start] != IGNORE))
            start, before = end, text
    return pieces


def print_stats(stats: dict, console) -> None:
    """Token lengths, truncation, rows that train nothing, and packing: for inspect and for runs."""
    from rich.markup import escape

    tokens, cut, masked, packing = stats["tokens"], stats["truncation"], stats["fully_masked"], stats["packing"]
    console.print(f"[bold]tokens[/] per row: min {tokens['min']}, median {tokens['median']:.0f}, p95 {tokens['p95']:.0f}, "
                  f"max {tokens['max']}; {tokens['total']:,} in all, {stats['trained_tokens']:,} trained")
    if stats.get("trains"):
        console.print(f"[bold]loss[/] {escape(stats['trains'])}")
    console.print(f"[bold]truncation[/] max_length {cut['max_length']} ({cut['mode']}): {cut['rows']} rows cut, "
                  f"{cut['tokens_cut']:,} tokens lost ({cut['trained_tokens_cut']:,} of them trained)")
    if masked["count"]:
        shown = ", ".join(map(str, masked["rows"][:20])) + (" ..." if masked["count"] > 20 else "")
        console.print(f"[yellow]fully masked[/] {masked['count']} rows train nothing (0-based rows: {shown})")
    if packing["bins"] is not None:
        console.print(f"[bold]packing[/] {'on' if packing['enabled'] else 'off'} ({escape(packing['reason'])}); efficiency "
                      f"{packing['efficiency_unpacked']:.0%} padded to max_length, {packing['efficiency_packed']:.0%} "
                      f"packed (BFD, {packing['bins']} bin{'s' if packing['bins'] != 1 else ''})")


def render(document: dict, console) -> None:
    from rich.markup import escape
    from rich.text import Text

    stats = document["stats"]
    sets = document.get("eval_sets") or {}
    held_out = (f"eval sets {', '.join(f'{escape(name)} {count}' for name, count in sets.items())} rows" if sets
                else f"{document['eval_rows']} eval rows")
    console.print(f"[bold]data[/] {escape(document['source'])}: {document['rows']} train rows ({document['format']}, TRL shape "
                  f"{document['shape']}), {held_out}; tokenizer {escape(document['tokenizer'])}")
    for note in document.get("notes", []):
        console.print(f"[yellow]note[/] {escape(note)}")
    print_stats(stats, console)
    for i, example in enumerate(document["examples"]):
        legend = "[bold green]trained[/], [dim]context[/]" if console.is_terminal else "⟦trained⟧, context"
        console.rule(f"example {i} ({len(example['input_ids'])} tokens; {legend})")
        text = Text()
        for piece, trained in example["pieces"]:
            if trained and not console.is_terminal:
                piece = f"⟦{piece}⟧"  # no colours in a pipe or a log: mark trained text in brackets
            text.append(piece, style="bold green" if trained else "dim")
        console.print(text)


def to_json(document: dict) -> dict:
    """The --json document (``pieces`` is for rendering only)."""
    return {**document, "examples": [{k: v for k, v in e.items() if k != "pieces"} for e in document["examples"]]}
