import sys
from pathlib import Path

import pytest

# The trainer tests' helpers (tiny word-level chat tokenizer, tiny models, interaction streams).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads (see tests/training/conftest.py)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
