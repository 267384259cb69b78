"""Unsloth's calling convention on fasttune: ``FastLanguageModel`` and the saving calls Unsloth's notebooks make."""
