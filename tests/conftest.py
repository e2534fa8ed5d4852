import os

# Read at import time by huggingface_hub and transformers: set before anything imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from transformers_spring.memory import HashingEncoder, LoGoMemory  # noqa: E402


@pytest.fixture
def encoder():
    return HashingEncoder(64)


@pytest.fixture
def make_memory(encoder):
    def make(**kwargs):
        kwargs.setdefault("gate", None)
        kwargs.setdefault("num_threads", 1)
        return LoGoMemory(kwargs.pop("encoder", encoder), **kwargs)

    return make
