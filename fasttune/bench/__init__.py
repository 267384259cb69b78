"""The bench: fasttune against vanilla transformers + PEFT + TRL on the same examples, side by side."""
