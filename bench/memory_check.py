"""The memory plan against what real models hold on this machine's CPU: a table, part by part.

For tiny and small models of three families (llama, qwen3, phi3), QLoRA (bitsandbytes' CPU
backend), LoRA and full fine-tuning, with and without gradient checkpointing, each part the
plan (fasttune.memory.plan) predicts beside what fasttune.memory.measure reads from the live
model, and a training step's peak allocation (PyTorch's profiler) beside the plan's activations +
logits + gradients. tests/test_memory_proof.py holds the same measurements to 10%.

    .venv/bin/python bench/memory_check.py            # about 2 minutes on 2 CPU cores
    .venv/bin/python bench/memory_check.py --small    # only the small (41M-parameter) models
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from fasttune.families import get_family  # noqa: E402
from fasttune.memory import measure  # noqa: E402
from fasttune.memory.plan import PARTS, Setup, Shape, estimate  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000)
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=16000)
FAMILY_VALUES = {"llama": {}, "qwen3": {"head_dim": 24}, "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}
RANK = 8


def build(family: str, method: str, checkpointing: bool, values: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **values, **FAMILY_VALUES[family])
    torch.manual_seed(0)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        folder = tempfile.mkdtemp()
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu", attn_implementation="sdpa",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        if checkpointing:
            model.gradient_checkpointing_enable(**kwargs)
            if method == "lora":
                model.enable_input_require_grads()
    if method != "full":
        targets = list(get_family(family).target_modules)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    return config, model


def measured(model, batch: dict, vocab: int, checkpointing: bool, rows: int, seq: int) -> tuple[dict, int]:
    """The parts as the live model holds them, and the profiler's peak of a second training step."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    got = measure.parameter_parts(model)
    seen = {}

    def step():
        model(**batch, use_cache=False).loss.backward()
        seen["gradients"] = measure.gradient_bytes(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    got["optimizer"] = measure.optimizer_bytes(optimizer)
    peak = measure.profiled_peak(step)
    got["gradients"] = seen["gradients"]
    activations, _ = measure.saved_by_kind(model, batch, vocab)
    layer = measure.layer_saved_bytes(model, batch)
    got["logits"] = measure.logits_peak(model, rows, seq)
    # backward's working set, and with checkpointing the recomputed layer where it exceeds the logits
    got["activations"] = activations + (max(0, 2 * layer - got["logits"]) if checkpointing else layer)
    return got, peak


def planned(config, family: str, method: str, checkpointing: bool, rows: int, seq: int):
    setup = Setup(method=method, width=4, batch=rows, sequence=seq, packing=False, gradient_checkpointing=checkpointing,
                  optimizer="adamw_torch", attention="sdpa", backend="hf", cuda=False, lora_rank=RANK)
    return estimate(Shape.from_config(config.to_dict()), get_family(family), setup)


SMALL_CASES = [("llama", "lora", False, 128), ("llama", "lora", True, 256), ("llama", "qlora", True, 128), ("llama", "full", False, 128),
               ("qwen3", "lora", False, 256), ("phi3", "full", True, 256)]
"""(family, method, gradient checkpointing, sequence length) of the small models measured."""
TINY_CASES = [(family, method, checkpointing, seq) for family in FAMILY_VALUES for method in ("qlora", "lora", "full")
              for checkpointing in (False, True) for seq in (32, 96)]


def compare(family: str, method: str, checkpointing: bool, values: dict, rows: int, seq: int):
    """``(plan, measured parts, measured step peak)`` of one case."""
    import torch

    config, model = build(family, method, checkpointing, values)
    ids = torch.randint(0, values["vocab_size"], (rows, seq))
    got, peak = measured(model, {"input_ids": ids, "labels": ids}, values["vocab_size"], checkpointing, rows, seq)
    return planned(config, family, method, checkpointing, rows, seq), got, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="only the small models")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    cases = [("small", SMALL, c) for c in SMALL_CASES] + ([] if args.small else [("tiny", TINY, c) for c in TINY_CASES])
    shown = [p for p in PARTS if p != "overhead"]
    print("| model | family | method | checkpointing | rows x tokens | " + " | ".join(f"{p} (plan / measured)" for p in shown)
          + " | step peak MB (plan / profiler) |")
    print("|---" * (6 + len(shown)) + "|")
    for size, values, (family, method, checkpointing, seq) in cases:
        plan, got, peak = compare(family, method, checkpointing, values, 2, seq)
        cells = [f"{plan.parts[p] / 1e6:.2f} / {got[p] / 1e6:.2f}" if p in got else "-" for p in shown]
        step = plan.parts["activations"] + plan.parts["logits"] + plan.parts["gradients"]
        print(f"| {size} | {family} | {method} | {'yes' if checkpointing else 'no'} | 2 x {seq} | " + " | ".join(cells)
              + f" | {step / 1e6:.1f} / {peak / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
