"""Fixtures for the trainer tests (helpers live in `tests/testing_utils.py`)."""

import pytest
from testing_utils import TRAINING_VOCAB, make_buffer_memory, make_model, make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer(TRAINING_VOCAB, chat=True)


@pytest.fixture
def model():
    return make_model("llama", TRAINING_VOCAB.size)


@pytest.fixture
def memory():
    return make_buffer_memory()
