"""How much disk a run will write, checked before it trains.

Two checkpoints (the Trainer keeps the newest one complete while it writes the next) plus the
final saves: the trained weights, and the merged model and GGUF files the recipe's ``export:``
asks for. A checkpoint holds the trainable weights in their own dtype, the optimizer's state (two
float32 moments per trainable weight for AdamW, two bytes for 8-bit optimizers) and, for full
fine-tuning, the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass

from fasttune.disk import gib
from fasttune.gguf_types import BITS_PER_WEIGHT


@dataclass(frozen=True)
class SpaceNeeded:
    checkpoint: int
    checkpoints: int
    """How many the estimate counts at once (0 when the run saves none)."""
    finals: int

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint + self.finals

    def describe(self) -> str:
        parts = [f"{self.checkpoints} checkpoints of about {gib(self.checkpoint)}"] if self.checkpoints else []
        return " + ".join(parts + [f"the final saves, about {gib(self.finals)}"])


def optimizer_bytes_per_weight(optim: str) -> int:
    return 2 if "8bit" in optim else 8


def estimate(model, recipe, sft_args) -> SpaceNeeded:
    """The disk a run of ``recipe`` with ``model`` (as the Trainer holds it) will need."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained_bytes = sum(p.numel() * p.element_size() for p in trainable)
    total_params = sum(p.numel() for p in model.parameters())
    if getattr(model, "is_loaded_in_4bit", False):
        total_params *= 2  # a 4-bit Params4bit packs two weights per element
    optim = str(getattr(sft_args.optim, "value", sft_args.optim))  # OptimizerNames is a str enum
    optimizer = sum(p.numel() for p in trainable) * optimizer_bytes_per_weight(optim)
    checkpoint = trained_bytes + optimizer
    saves = sft_args.save_strategy != "no"  # SaveStrategy is a str enum
    finals = trained_bytes if recipe.method != "full" else total_params * 2
    if recipe.method != "full":
        if recipe.export.merged or recipe.export.gguf:
            finals += total_params * 2
        finals += sum(total_params * BITS_PER_WEIGHT[t] / 8 for t in recipe.export.gguf)
    return SpaceNeeded(checkpoint=checkpoint, checkpoints=2 if saves else 0, finals=int(finals))
