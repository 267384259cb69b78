"""Benchmark: tokenize and mask 10,000 generated multi-turn conversations (~500 tokens each).

Uses the real SmolLM2 tokenizer with fasttune's chatml training template (tests/fixtures, offline)
and the demo's rules (assistant_only_loss, max_length 2048). Target: under 30 s on 2 cores.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data_prep.py [--rows 10000] [--num-proc N]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

WORDS = ("the model learns from every example we give it and the loss goes down as training proceeds "
         "data quality matters more than quantity so we check each conversation before we train on it "
         "a short answer is often better than a long one but explanations help when the question is hard "
         "Paris Rome Berlin Madrid Lisbon numbers like 42 and 3.14 appear in code such as print(x) too").split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice((".", "?", "!"))


def conversation(rng: random.Random) -> dict:
    """A system turn, then 2-4 exchanges; about 500 tokens in all."""
    messages = [{"role": "system", "content": sentence(rng, 12)}]
    turns = rng.randint(2, 4)
    for _ in range(turns):
        messages.append({"role": "user", "content": " ".join(sentence(rng, 14) for _ in range(rng.randint(1, 3)))})
        messages.append({"role": "assistant", "content": " ".join(sentence(rng, 16) for _ in range(360 // (turns * 16)))})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--num-proc", type=int, default=None, help="datasets.map workers (default: fasttune's choice)")
    args = parser.parse_args()

    import datasets

    from fasttune.data.tokenize import MaskRules, report, tokenize
    from fixtures.real_tokenizers import load_tokenizer

    datasets.disable_progress_bars()
    datasets.disable_caching()
    rng = random.Random(0)
    rows = [conversation(rng) for _ in range(args.rows)]
    tokenizer = load_tokenizer("smollm2")
    rules = MaskRules(assistant_only_loss=True, max_length=2048)
    started = time.perf_counter()
    tokenized = tokenize(rows, tokenizer, rules, num_proc=args.num_proc)
    tokenized_s = time.perf_counter() - started
    stats = report(tokenized, rules)
    wall = time.perf_counter() - started
    tokens = stats.tokens["total"]
    print(f"machine: {platform.machine()} {platform.processor() or ''} nproc={os.cpu_count()} python {platform.python_version()}")
    print(f"rows {stats.rows:,}, tokens {tokens:,} (median {stats.tokens['median']:.0f}/row), trained {stats.trained_tokens:,}")
    print(f"tokenize+mask: {tokenized_s:.1f} s; with report (stats + BFD bins): {wall:.1f} s")
    print(f"{stats.rows / wall:,.0f} rows/s, {tokens / wall:,.0f} tokens/s")


if __name__ == "__main__":
    main()
