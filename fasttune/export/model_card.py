"""The model card (``README.md``) that travels with a merged model: what it is and how it was made.

The Hugging Face Hub reads the YAML front matter (base model, library, tags); people read the
rest: base model, recipe, LoRA settings, data, results, and how to run it.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

from fasttune.config import Recipe


def model_card(recipe: Recipe, info: dict[str, Any] | None = None) -> str:
    """Markdown for ``recipe``'s merged model (or, for a full fine-tune, its trained model); ``info``
    holds what the run measured (report keys: train_rows, data_source, data_format, final_train_loss,
    eval_loss, steps, task)."""
    info = info or {}
    full = recipe.method == "full"
    front = {"base_model": recipe.model.name, "library_name": "transformers",
             "tags": list(dict.fromkeys(["fasttune", recipe.method, *([] if full else ["lora"]), recipe.family, "text-generation"]))}
    lora = recipe.lora
    made = ("Every parameter fine-tuned with fasttune, saved as 16-bit safetensors." if full else
            "A LoRA adapter trained with fasttune and merged into a 16-bit copy of the base model.")
    method = (f"full (every parameter trained, optimizer {recipe.train.get('optim') or 'AdamW, the trainer default'})" if full else
              f"{recipe.method} (LoRA r={lora.get('r')}, alpha={lora.get('lora_alpha')}, "
              f"dropout={lora.get('lora_dropout', 0.0)}, targets {', '.join(lora.get('target_modules') or [])})")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {recipe.name} (fine-tuned {recipe.model.name})", "",
        f"{recipe.description or 'A fine-tune made with fasttune.'}", "",
        made, "",
        "## How it was made", "",
        "| | |", "|---|---|",
        f"| base model | `{recipe.model.name}` |",
        f"| method | {method} |",
        *([f"| trained on from | adapter `{recipe.model.adapter}` |"] if recipe.model.adapter else []),
        f"| recipe | `{recipe.name}` (fasttune) |",
    ]
    for label, key in (("data", "data_source"), ("data format", "data_format"), ("training rows", "train_rows"),
                       ("optimizer steps", "steps"), ("final train loss", "final_train_loss"), ("eval loss", "eval_loss")):
        if info.get(key) is not None:
            value = info[key]
            lines.append(f"| {label} | {f'{value:.4f}' if isinstance(value, float) else value} |")
    task = info.get("task")
    if task and task.get("before") is not None and task.get("after") is not None:
        lines += ["", f"## Task metric: {task['name']} (held-out rows)", "", "| metric | before | after |", "|---|---:|---:|"]
        lines += [f"| {k} | {task['before'].get(k, float('nan')):.2f} | {v:.2f} |" for k, v in task["after"].items()]
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH", dtype="auto")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")  # carries the chat template it was trained with',
        f"messages = {json.dumps([{'role': 'user', 'content': 'Hello!'}])}",
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=128)[0][ids.shape[1]:], skip_special_tokens=True))",
        "```", "",
    ]
    if recipe.export.gguf:
        lines += ["GGUF files for llama.cpp, Ollama and LM Studio are in `../gguf/`, each with an Ollama `Modelfile`:",
                  "`ollama create NAME -f Modelfile`.", ""]
    return "\n".join(lines)
