"""The model station: where weights come from, the tokenizer's family policy, and the backends."""
