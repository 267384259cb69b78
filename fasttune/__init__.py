"""fasttune: single-GPU LoRA/QLoRA fine-tuning from named recipes (see README.md).

``from fasttune import FastLanguageModel`` gives Unsloth's calling convention on either backend
(fasttune/unsloth_api/fast_language_model.py). It is imported on first use, so ``python -m fasttune --help`` and the
recipe listing never import torch.
"""

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "__version__"]


def __getattr__(name: str):
    if name == "FastLanguageModel":
        from fasttune.unsloth_api.fast_language_model import FastLanguageModel

        return FastLanguageModel
    raise AttributeError(f"module 'fasttune' has no attribute {name!r}")
