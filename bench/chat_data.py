"""Chat data with realistic, varied lengths for bench runs, generated in code (no download).

Real instruction data mixes one-line questions with long multi-turn exchanges: lengths spread over
two orders of magnitude, which is what makes padding expensive and packing worth it. This writes
conversations in TRL's ``messages`` format whose turn count and turn lengths follow that shape
(log-normal lengths, 1-3 exchanges, an occasional system prompt), from a fixed seed.

    python bench/chat_data.py OUT.jsonl [--rows 600] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

TOPICS = ("a sourdough starter", "the water cycle", "binary search", "a bicycle chain", "compound interest", "photosynthesis",
          "a Python dictionary", "the French Revolution", "a heat pump", "tide tables", "a chess opening", "vaccines",
          "a budget spreadsheet", "black holes", "a job interview", "container gardening", "unit testing", "jet lag")
ASKS = ("Explain {t} to a beginner.", "What should I know about {t}?", "Give me three tips about {t}.",
        "Write a short note on {t} for my notes.", "How does {t} work, step by step?", "Compare two ways of dealing with {t}.")
WORDS = ("first", "then", "because", "usually", "which", "means", "the", "a", "small", "important", "part", "is", "that",
         "you", "can", "check", "each", "step", "before", "moving", "on", "it", "helps", "to", "keep", "notes", "and", "measure",
         "results", "carefully", "when", "something", "changes", "over", "time", "most", "people", "find", "this", "easier",
         "with", "practice", "example", "value", "simple", "rule", "works", "well", "in", "practice", "but", "edge", "cases")


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    return " ".join(words).capitalize() + "."


def reply(rng: random.Random, mean_words: float) -> str:
    """A reply of log-normally distributed length (median ``mean_words``), in paragraphs."""
    target = max(8, int(rng.lognormvariate(math.log(mean_words), 0.9)))
    sentences, count = [], 0
    while count < target:
        sentences.append(sentence(rng))
        count += len(sentences[-1].split())
    paragraphs = [" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)]
    return "\n\n".join(paragraphs)


def conversation(rng: random.Random) -> dict:
    topic = rng.choice(TOPICS)
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a patient, precise assistant."})
    for turn in range(rng.choice((1, 1, 1, 2, 3))):
        ask = rng.choice(ASKS).format(t=topic) if turn == 0 else f"Can you say more about {rng.choice(WORDS)} {rng.choice(WORDS)}?"
        messages.append({"role": "user", "content": ask})
        messages.append({"role": "assistant", "content": reply(rng, mean_words=rng.choice((25, 60, 120)))})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(args.rows)), encoding="utf-8")
    print(f"wrote {args.rows} conversations to {out}")


if __name__ == "__main__":
    main()
