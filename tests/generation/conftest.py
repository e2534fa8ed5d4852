"""Fixtures for the generation tests (helpers live in `tests/testing_utils.py`)."""

import pytest
from testing_utils import ARCHS, FakeMemory, make_model, make_tokenizer


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return make_model(arch)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def chat_tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture
def memory():
    return FakeMemory(
        {
            "alice": [("cats rain", "cats headline w1 w2"), ("cats sun", "w3 w4 cats")],
            "bob": [("vote dogs", "dogs vote w5"), ("dogs", "w6 w7 w8 dogs dogs"), ("sun", "w9")],
        }
    )
