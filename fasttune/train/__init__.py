"""The train station: SFTTrainer with a live display, metrics.jsonl, checkpoints and the run record."""
