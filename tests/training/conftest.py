"""Fixtures for the trainer tests (helpers live in `training_testing.py`)."""

import pytest
from training_testing import make_buffer_memory, make_model, make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture
def model():
    return make_model("llama")


@pytest.fixture
def memory():
    return make_buffer_memory()


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes each forward
    ~100x slower; restored after each test so other test directories are unaffected."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
