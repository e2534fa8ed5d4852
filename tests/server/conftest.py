"""A saved tiny ContinualPersonalizer state that the server tests serve (built once per session)."""

import pytest
from testing_utils import TRAINING_VOCAB, make_args, make_model, make_tokenizer, topical

from transformers_spring.memory import HashingEncoder, LoGoMemory
from transformers_spring.training import ContinualPersonalizer

USERS = {"alice": "cats", "bob": "elections"}


def build_state(root):
    """Saves a base model under `root/base` and a state with two trained users under `root/state`."""
    from transformers import AutoModelForCausalLM

    make_model("llama", TRAINING_VOCAB.size).save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    memory = LoGoMemory(HashingEncoder(32), scorer="bm25", gate=None, buffer_size=3, num_threads=1)
    personalizer = ContinualPersonalizer(
        model, make_tokenizer(TRAINING_VOCAB, chat=True), make_args(root, buffer_size=3, selection_ratio=1.0), memory
    )
    for user, topic in USERS.items():
        items = [topical(user, topic, i, ts=1000.0 + i) for i in range(6)]
        memory.add_many(items)
        personalizer.observe(user, items)
    personalizer.save_pretrained(root / "state")
    return root / "state"


@pytest.fixture(scope="session")
def served_state(tmp_path_factory):
    return build_state(tmp_path_factory.mktemp("served"))
