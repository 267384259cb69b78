"""Count what autograd keeps for backward in each family's decoder layer, and write the counts that
fasttune's memory plan reads (fasttune/memory/activations.json).

For every family, attention implementation (sdpa, eager), method (LoRA on every linear layer, or
all parameters), dtype (float32, bfloat16) and gradient checkpointing (off, on), tiny models of
2 and 3 layers run one forward with labels under ``torch.autograd.graph.saved_tensors_hooks``;
the bytes of every distinct storage saved (parameters left out) are summed. The 3-layer total
less the 2-layer one is one decoder layer; the 2-layer total less two layers is what the
embedding, final norm, lm_head and loss keep. Each is then solved, by least squares over
models of varied shapes, as bytes per element of a few products of the shapes (tokens x hidden,
tokens x query width, batch x heads x sequence^2, ...). The fit must be near exact (a residual
above 2% stops the census; the slack is PyTorch's CPU attention kernel, which keeps its small
log-sum-exp at some lengths only): these are counts of the tensors the library code saves, for
the pinned transformers and PEFT, not a regression of noisy timings.
fasttune's tests measure real models of other shapes against the plan made from these counts.

Run it again after upgrading transformers or PEFT:

    .venv/bin/python bench/activation_census.py          # about 10 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fasttune" / "memory" / "activations.json"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
HEAD_DIM_FIXED = {"phi3"}
"""Families whose config has no ``head_dim``: it is hidden / heads (the plan's shapes obey the same rule)."""
LAYER_TERMS = ("tokens_x_hidden", "tokens_x_q", "tokens_x_kv", "tokens_x_intermediate", "tokens_x_rank", "tokens_x_heads",
               "tokens_x_kv_heads", "tokens", "batch_x_heads_x_seq2", "batch_x_seq2")
HEAD_TERMS = ("tokens_x_vocab", "tokens_x_hidden", "tokens", "seq_x_head_dim", "one")
BASE = dict(h=64, i=160, nh=4, kv=2, hd=24, r=8, b=2, s=32, V=1000)
VARIED = [("h", 96), ("i", 224), ("nh", 8), ("kv", 4), ("hd", 32), ("r", 16), ("s", 48), ("s", 64), ("b", 3), ("b", 4),
          ("V", 1500), ("nh", 2), ("hd", 40)]
COMBINED = [dict(hd=32, nh=8), dict(hd=40, kv=1), dict(s=48, nh=8), dict(s=64, b=3), dict(s=48, kv=4, nh=8), dict(b=3, V=1500), dict(s=64, h=96), dict(s=64, nh=2, kv=1)]
"""Shapes varied together, so that every product is independent of the others (the census checks the rank)."""


def terms(p: dict) -> tuple[list[float], list[float]]:
    """The layer and head products of shape ``p``, in LAYER_TERMS / HEAD_TERMS order."""
    tokens = p["b"] * p["s"]
    layer = [tokens * p["h"], tokens * p["nh"] * p["hd"], tokens * p["kv"] * p["hd"], tokens * p["i"], tokens * p["r"],
             tokens * p["nh"], tokens * p["kv"], tokens, p["b"] * p["nh"] * p["s"] ** 2, p["b"] * p["s"] ** 2]
    return layer, [tokens * p["V"], tokens * p["h"], tokens, p["s"] * p["hd"], 1]


def saved_bytes(family: str, method: str, attention: str, dtype: str, checkpointing: bool, layers: int, p: dict) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {} if family in HEAD_DIM_FIXED else {"head_dim": p["hd"]}
    if family == "gemma2":
        extra["query_pre_attn_scalar"] = p["hd"]
    config = AutoConfig.for_model(family, hidden_size=p["h"], intermediate_size=p["i"], num_hidden_layers=layers,
                                  num_attention_heads=p["nh"], num_key_value_heads=p["kv"], vocab_size=p["V"],
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=getattr(torch, dtype))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=p["r"], lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    from fasttune.memory.measure import SavedTensors

    ids = torch.randint(0, p["V"], (p["b"], p["s"]))
    with SavedTensors(model) as saved:
        model(input_ids=ids, labels=ids, use_cache=False)
    return saved.total


def census(family: str, method: str, attention: str, dtype: str, checkpointing: bool) -> dict:
    import numpy as np

    points = [BASE] + [dict(BASE, **{key: value}) for key, value in VARIED] + [dict(BASE, **combo) for combo in COMBINED]
    if family in HEAD_DIM_FIXED:
        points = [dict(p, hd=p["h"] // p["nh"]) for p in points]
    layer_rows, layer_bytes, head_rows, head_bytes = [], [], [], []
    for p in points:
        two, three = (saved_bytes(family, method, attention, dtype, checkpointing, n, p) for n in (2, 3))
        layer, head = terms(p)
        layer_rows.append(layer)
        layer_bytes.append(three - two)
        head_rows.append(head)
        head_bytes.append(two - 2 * (three - two))
    out = {}
    for name, rows, ys, names in (("layer", layer_rows, layer_bytes, LAYER_TERMS), ("head", head_rows, head_bytes, HEAD_TERMS)):
        a, y = np.array(rows, float), np.array(ys, float)
        free = [column for column in range(a.shape[1]) if a[:, column].any()]
        if family not in HEAD_DIM_FIXED and np.linalg.matrix_rank(a[:, free]) < len(free):
            sys.exit(f"the {name} products are not independent over the census' shapes: add shapes to COMBINED")
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        worst = float(np.max(np.abs(a @ coef - y) / y))
        if worst > 0.02:
            sys.exit(f"{family}/{method}/{attention}/{dtype}/checkpointing={checkpointing}: the {name} fit is off by "
                     f"{worst:.2%}: the saved tensors depend on a shape this census does not vary")
        out[name] = {n: round(float(c), 4) for n, c in zip(names, coef) if abs(c) > 1e-6}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    import peft
    import torch
    import transformers

    table = {"measured_with": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                               "peft": peft.__version__}, "counts": {}}
    for family in args.families.split(","):
        for attention in ("sdpa", "eager"):
            for method in ("lora", "full"):
                for dtype in ("float32", "bfloat16"):
                    for checkpointing in (False, True):
                        key = f"{family}/{attention}/{method}/{dtype}/{'checkpointing' if checkpointing else 'stored'}"
                        table["counts"][key] = census(family, method, attention, dtype, checkpointing)
                        print(key, table["counts"][key], flush=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
