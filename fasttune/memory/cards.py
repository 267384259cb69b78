"""GPU cards by name, for ``plan --gpu "RTX 4090"`` (torch-free).

Sizes are the memory the card reports to CUDA, in GiB (a "24 GB" RTX 4090 reports 23.6-24 GiB;
the figures below are the nominal sizes, which is what the card's owner knows it by).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fasttune.errors import Problem, UserError, suggest

CARDS: dict[str, float] = {
    "GTX 1080 Ti": 11, "RTX 2060": 6, "RTX 2070": 8, "RTX 2080": 8, "RTX 2080 Ti": 11, "Titan RTX": 24,
    "RTX 3060": 12, "RTX 3060 Ti": 8, "RTX 3070": 8, "RTX 3070 Ti": 8, "RTX 3080": 10, "RTX 3080 Ti": 12, "RTX 3090": 24,
    "RTX 3090 Ti": 24, "RTX 4060": 8, "RTX 4060 Ti": 16, "RTX 4070": 12, "RTX 4070 Super": 12, "RTX 4070 Ti": 12,
    "RTX 4070 Ti Super": 16, "RTX 4080": 16, "RTX 4080 Super": 16, "RTX 4090": 24, "RTX 5060 Ti": 16, "RTX 5070": 12,
    "RTX 5070 Ti": 16, "RTX 5080": 16, "RTX 5090": 32, "RTX A4000": 16, "RTX A5000": 24, "RTX A6000": 48,
    "RTX 6000 Ada": 48, "T4": 16, "V100": 16, "A10": 24, "A10G": 24, "L4": 24, "L40S": 48, "A100": 80, "A100 40GB": 40,
    "H100": 80, "H200": 141, "B200": 180,
}


@dataclass(frozen=True)
class Card:
    name: str
    gib: float
    detected: bool = False
    """Read from this machine's GPU (else asked for with --gpu)."""

    def describe(self) -> str:
        size = "" if "GiB" in self.name else f" ({self.gib:g} GiB{', this machine' if self.detected else ''})"
        return self.name + size


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("geforce", "").replace("nvidia", ""))


def card(text: str) -> Card:
    """``--gpu``: a size in GiB (``12``, ``12GB``) or a card's name (``"RTX 4090"``, ``4090``)."""
    wanted = _key(text)
    for name, gib in CARDS.items():  # a card's name first: "4090" is the RTX 4090, not 4090 GiB
        if _key(name) == wanted or _key(name).removeprefix("rtx") == wanted:
            return Card(name, gib)
    size = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(gib|gb|g)?\s*", text.lower())
    if size:
        gib = float(size.group(1))
        if gib <= 0:
            raise UserError(Problem("--gpu", text, "is a card's memory: more than 0 GiB", "give e.g. --gpu 12 or --gpu 'RTX 4090'"))
        return Card(f"{'an' if f'{gib:g}'.startswith(('8', '11', '18')) else 'a'} {gib:g} GiB GPU", gib)
    hint = suggest(text, list(CARDS))
    raise UserError(Problem("--gpu", text, "is neither a size in GiB nor a card fasttune knows",
                            (hint + "; " if hint else "") + "give the card's memory instead, e.g. --gpu 12"))
