"""The memory one training step needs, predicted before any weights load (torch-free).

Sizes come from the model's config values (fasttune.architectures), the family's facts, and the
settings a run binds; nothing is imported or loaded. The parts, in bytes:

``weights``
    the frozen parameters: 4-bit storage of the decoder's projections for QLoRA (two weights a
    byte), plus what stays 16- or 32-bit (embeddings, lm_head, norms, biases), after the upcast the
    backend does (PEFT's ``prepare_model_for_kbit_training`` lifts every 16-bit parameter to
    float32; fasttune casts the embeddings and lm_head back, fasttune.model.backends.hf).
``quant_constants``
    bitsandbytes' per-block scales of the 4-bit weights (64 weights a block; with double quant the
    scales are themselves 8-bit, 256 a block).
``trainable``, ``gradients``
    LoRA's A and B (float32, as PEFT keeps them) or every parameter (full fine-tuning, in the
    training dtype), and one gradient of each.
``optimizer``
    torch's AdamW: two states per parameter in its dtype; bitsandbytes' 8-bit AdamW: two bytes per
    parameter (tensors under 4096 elements keep 32-bit states); SGD none.
``activations``
    what autograd keeps for backward in the worst micro-batch, from the counts of
    ``activations.json`` (bench/activation_census.py counts them for each family in the pinned
    transformers and PEFT), plus one layer's worth for the gradients backward holds beside them.
    With gradient checkpointing: each layer's input, plus one layer's tensors while backward
    recomputes it (and its gradients), counted where they exceed the logits part: the loss's
    tensors are freed before the first layer is recomputed, so the two are never alive together.
``logits``
    the lm_head output and the loss: the float32 log-softmax kept for backward and, at the peak
    (in backward), its gradient and the logits' gradient, tokens x vocabulary each.
``overhead``
    on CUDA only: the context and cuBLAS workspace outside PyTorch's allocator, and the allocator's
    slack (fragmentation), stated as the constants below.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fasttune.families import Family

PARTS = ("weights", "quant_constants", "trainable", "gradients", "optimizer", "activations", "logits", "overhead")
GIB = 2**30
CUDA_CONTEXT = int(0.5 * GIB)
"""The CUDA context, kernels and cuBLAS workspace: outside torch's allocator (0.3-0.6 GiB on recent cards)."""
ALLOCATOR_SLACK = 0.05
"""Memory PyTorch's caching allocator reserves but cannot hand out (fragmentation), as a share of the rest."""
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
OPTIMIZER_8BIT_BLOCK = 256
OPTIMIZER_8BIT_MIN = 4096
"""bitsandbytes keeps 32-bit states for tensors smaller than this (its ``min_8bit_size``)."""
LOGIT_TENSORS_AT_PEAK = 3
"""Float32 tokens x vocab tensors alive at the loss's backward: the saved log-softmax, its gradient, the logits' gradient."""
COUNTS_FILE = Path(__file__).with_name("activations.json")


@dataclass(frozen=True)
class Shape:
    """The sizes of one decoder model, from its config values."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, values: dict) -> "Shape":
        heads = int(values["num_attention_heads"])
        hidden = int(values["hidden_size"])
        model_type = values["model_type"]
        return cls(model_type, hidden, int(values["intermediate_size"]), int(values["num_hidden_layers"]), heads,
                   int(values.get("num_key_value_heads") or heads), int(values.get("head_dim") or hidden // heads),
                   int(values["vocab_size"]), bool(values.get("tie_word_embeddings", model_type == "gemma2")),
                   bool(values.get("attention_bias", model_type == "qwen2")))

    def projections(self, family: Family) -> dict[str, tuple[int, int]]:
        """``{module name: (in, out)}`` of one decoder layer's linear layers (the family's targets are all of them)."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        known = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                 "up_proj": (h, i), "down_proj": (i, h), "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}
        return {name: known[name] for name in family.target_modules}

    def small_per_layer(self, family: Family) -> list[int]:
        """The sizes of one layer's parameters that are not projections (norms, biases)."""
        sizes = [self.hidden] * family.decoder_norms + ([self.head_dim] * 2 if family.qk_norms else [])
        if self.qkv_bias:
            sizes += [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        return sizes

    def parameter_count(self, family: Family) -> int:
        per_layer = sum(a * b for a, b in self.projections(family).values()) + sum(self.small_per_layer(family))
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


@dataclass(frozen=True)
class Setup:
    """What a run does, as far as memory goes (made from a recipe by fasttune.memory.setup)."""

    method: str
    """qlora, lora or full."""
    width: int
    """Bytes of the compute dtype: 4 (float32), 2 (bfloat16, float16)."""
    batch: int
    """Rows in one micro-batch (per_device_train_batch_size)."""
    sequence: int
    """Tokens of the longest row the run trains (capped at max_length)."""
    packing: bool
    gradient_checkpointing: bool
    optimizer: str
    attention: str
    """sdpa, eager, flash_attention_2, unsloth."""
    backend: str
    cuda: bool
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None
    """The projections LoRA adapts (None: all of them)."""
    lora_dropout: float = 0.0
    double_quant: bool = True
    offload_checkpoints: bool = False
    """Unsloth's checkpointing, which moves each layer's saved input to host RAM (512 tokens and more)."""


@dataclass(frozen=True)
class MemoryPlan:
    parts: dict[str, int]
    """Bytes, by the names of PARTS."""
    setup: Setup
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {name: self.parts[name] / GIB for name in PARTS}


@cache
def census() -> dict:
    return json.loads(COUNTS_FILE.read_text(encoding="utf-8"))


def counts_key(family: str, setup: Setup, checkpointing: bool) -> str:
    kind = "eager" if setup.attention == "eager" else "sdpa"
    return (f"{family}/{kind}/{'full' if setup.method == 'full' else 'lora'}/{'float32' if setup.width == 4 else 'bfloat16'}"
            f"/{'checkpointing' if checkpointing else 'stored'}")


def micro_batch(setup: Setup) -> tuple[int, int]:
    """``(rows, tokens per row)`` of the worst micro-batch: with padding-free packing, one row of
    ``batch x max_length`` tokens; without, ``batch`` rows padded to the longest."""
    return (1, setup.batch * setup.sequence) if setup.packing else (setup.batch, setup.sequence)


def _products(shape: Shape, rows: int, seq: int, rank: int) -> dict[str, int]:
    tokens = rows * seq
    return {"tokens_x_hidden": tokens * shape.hidden, "tokens_x_q": tokens * shape.heads * shape.head_dim,
            "tokens_x_kv": tokens * shape.kv_heads * shape.head_dim, "tokens_x_intermediate": tokens * shape.intermediate,
            "tokens_x_rank": tokens * rank, "tokens_x_heads": tokens * shape.heads, "tokens_x_kv_heads": tokens * shape.kv_heads,
            "tokens": tokens, "batch_x_heads_x_seq2": rows * shape.heads * seq * seq, "batch_x_seq2": rows * seq * seq,
            "tokens_x_vocab": tokens * shape.vocab, "seq_x_head_dim": seq * shape.head_dim, "one": 1}


def _counted(terms: dict[str, float], products: dict[str, int], skip: tuple[str, ...] = ()) -> float:
    return sum(coef * products[name] for name, coef in terms.items() if name not in skip)


def activation_bytes(shape: Shape, family: Family, setup: Setup) -> int:
    """What autograd holds for backward in the worst micro-batch, the logits' part left out."""
    rows, seq = micro_batch(setup)
    projections = shape.projections(family)
    targets = setup.lora_targets or tuple(projections)
    rank = setup.lora_rank if setup.method != "full" else 0
    # The census adapts every projection; fewer targets keep fewer rank-wide A outputs.
    products = _products(shape, rows, seq, rank * len([t for t in targets if t in projections]) // len(projections))
    stored = census()["counts"][counts_key(family.model_type, setup, False)]
    layer = _counted(stored["layer"], products)
    if setup.method != "full" and setup.lora_dropout:
        # PEFT drops out each target's input separately: a copy and its mask per target (not in the census).
        layer += sum(rows * seq * projections[t][0] * (setup.width + 1) for t in targets if t in projections)
    # Backward holds, beside what is saved, the gradients of the layer it is in: about one layer's worth more.
    working = layer
    if not setup.gradient_checkpointing:
        return int(shape.layers * layer + working + _counted(stored["head"], products, ("tokens_x_vocab",)))
    kept = census()["counts"][counts_key(family.model_type, setup, True)]
    inputs = 0 if setup.offload_checkpoints else shape.layers * _counted(kept["layer"], products)
    # The layer backward recomputes is alive only after the loss's tensors are freed: it counts
    # where it exceeds them (the logits part).
    recompute = max(0, layer + working - logits_bytes(shape, setup))
    return int(inputs + recompute + _counted(kept["head"], products, ("tokens_x_vocab",)))


def logits_bytes(shape: Shape, setup: Setup) -> int:
    rows, seq = micro_batch(setup)
    return rows * seq * shape.vocab * 4 * LOGIT_TENSORS_AT_PEAK


def _blocks(numel: int, size: int) -> int:
    return math.ceil(numel / size)


def optimizer_state_bytes(optimizer: str, sizes: list[int], width: int) -> tuple[int, str | None]:
    """Bytes of the optimizer's states for parameters of ``sizes`` elements in ``width``-byte
    dtype, and a note where the optimizer is not one fasttune knows."""
    name = optimizer.lower()
    if "8bit" in name:
        states = 1 if "lion" in name else 2
        total = 0
        for n in sizes:
            if n >= OPTIMIZER_8BIT_MIN:  # uint8 states, a float32 scale per block, a 256-entry code book each
                total += states * (n + 4 * _blocks(n, OPTIMIZER_8BIT_BLOCK) + 4 * 256)
            else:
                total += states * 4 * n
        return total, None
    if name.startswith("sgd"):
        return 0, None
    per = {"adamw": 2, "adam": 2, "lion": 1, "adagrad": 1, "rmsprop": 1}
    for prefix, states in per.items():
        if prefix in name:
            state_width = 4 if "32bit" in name or "bnb" in name else width
            return states * state_width * sum(sizes), None
    if "adafactor" in name:
        return 4 * sum(2 * math.isqrt(n) for n in sizes), None  # a row and a column factor per matrix, about
    return 2 * width * sum(sizes), f"optimizer {optimizer!r} is planned as AdamW (two states per parameter)"


def trainable_sizes(shape: Shape, family: Family, setup: Setup) -> list[int]:
    """Element counts of every trainable tensor (LoRA's A and B, or every parameter)."""
    projections = shape.projections(family)
    if setup.method == "full":
        per_layer = [a * b for a, b in projections.values()] + shape.small_per_layer(family)
        return per_layer * shape.layers + [shape.vocab * shape.hidden] * (1 if shape.tied else 2) + [shape.hidden]
    targets = setup.lora_targets or tuple(projections)
    per_layer = []
    for name in targets:
        if name in projections:
            fan_in, fan_out = projections[name]
            per_layer += [setup.lora_rank * fan_in, setup.lora_rank * fan_out]
    return per_layer * shape.layers


def estimate(shape: Shape, family: Family, setup: Setup) -> MemoryPlan:
    notes = []
    w = setup.width
    projections = shape.projections(family)
    linear = shape.layers * sum(a * b for a, b in projections.values())
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    small = shape.layers * sum(shape.small_per_layer(family)) + shape.hidden
    sizes = trainable_sizes(shape, family, setup)
    constants = 0
    if setup.method == "full":
        weights, trainable = 0, w * sum(sizes)
        gradient_width = w
    else:
        trainable, gradient_width = 4 * sum(sizes), 4  # PEFT keeps LoRA in float32 over a 16-bit base
        if setup.method == "qlora":
            # norms and biases float32 (PEFT's upcast), embeddings and lm_head in the compute dtype (fasttune's cast back)
            weights = (linear + 1) // 2 + embeddings * w + small * 4
            per_tensor = [a * b for a, b in projections.values()] * shape.layers
            if setup.double_quant:
                constants = sum(_blocks(n, QUANT_BLOCK) + 4 * _blocks(_blocks(n, QUANT_BLOCK), DOUBLE_QUANT_BLOCK)
                                + 4 * 256 + 4 + 4 * 16 for n in per_tensor)
            else:
                constants = sum(4 * _blocks(n, QUANT_BLOCK) + 4 * 16 for n in per_tensor)
        else:
            weights = (linear + embeddings + small) * w
    optimizer, note = optimizer_state_bytes(setup.optimizer, sizes, gradient_width)
    if note:
        notes.append(note)
    parts = {"weights": weights, "quant_constants": constants, "trainable": trainable,
             "gradients": gradient_width * sum(sizes), "optimizer": optimizer,
             "activations": activation_bytes(shape, family, setup), "logits": logits_bytes(shape, setup), "overhead": 0}
    if setup.cuda:
        parts["overhead"] = CUDA_CONTEXT + int(ALLOCATOR_SLACK * sum(parts.values()))
    if setup.backend == "unsloth":
        notes.append("Unsloth's fused kernels keep fewer activations than transformers' layers; the plan counts "
                     "transformers' (an upper bound, not measured for Unsloth)")
    if setup.attention == "flash_attention_2":
        notes.append("flash_attention_2 is planned with sdpa's counts (both keep queries, keys, values, output and a log-sum-exp)")
    return MemoryPlan(parts, setup, tuple(notes))
