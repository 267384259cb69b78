"""The data station: sources → rows → TRL's dataset shapes (tokenizer only, never weights)."""
