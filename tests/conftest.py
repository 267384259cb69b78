"""Tests run offline: no hub, ever (a test that tried to download would fail, not hang)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fixtures.fake_hub import fake_hub  # noqa: E402, F401  (a fixture: the hub's HfApi replaced, for any test that asks)
