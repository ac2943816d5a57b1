import os

import pytest
import torch

# Tests never touch the network, and share one cache across runs (the embedded LLM conversion is cached).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny random LexVLA for read-only tests (tests that train build their own)."""
    import lexvla

    return lexvla.create_model("lexvla-tiny").eval()
