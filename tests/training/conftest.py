"""Fixtures for the trainer tests (helpers live in `training_testing.py`)."""

import pytest
from tiny_models import single_thread  # noqa: F401  (autouse: one torch thread per test)
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
