"""fasttune: single-GPU LoRA/QLoRA fine-tuning from named recipes (see README.md)."""

__version__ = "0.1.0"
