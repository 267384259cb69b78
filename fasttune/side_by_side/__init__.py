"""The `bench` verb: fasttune against vanilla transformers + PEFT + TRL on the same examples, side by side
(the repository's top-level bench/ holds the scripts that run it and other measurements on real machines)."""
