"""Folders saved by an earlier release still load: `tests/fixtures/saved_by_0_1/` holds what transformers_spring
0.1 saved (written by `tests/fixtures/make_saved_folders.py`; `expected.json` records what they held)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from testing_utils import PAD
from transformers import AutoModelForCausalLM

from transformers_spring.generation import SpringConfig, SpringForCausalLM
from transformers_spring.memory import HashingEncoder, LoGoMemory
from transformers_spring.training import ContinualPersonalizer

SAVED = Path(__file__).parent.parent / "fixtures" / "saved_by_0_1"
EXPECTED = json.loads((SAVED / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def saved(tmp_path):
    """A copy of the fixture folders: a load recovers a folder in place, and the checkout's copy stays untouched."""
    shutil.copytree(SAVED, tmp_path / "saved")
    return tmp_path / "saved"


def encoder():
    return HashingEncoder(EXPECTED["encoder_dim"])


def test_the_fixture_is_the_release_it_names():
    assert EXPECTED["version"].startswith("0.1.")


def test_spring_folder_loads_and_decodes_as_saved(saved):
    pytest.importorskip("hnswlib")
    expected = EXPECTED["spring"]
    spring = SpringForCausalLM.from_pretrained(
        saved / "spring", base_model_name_or_path=str(saved / "base"), memory_kwargs={"encoder": encoder()}
    )
    assert sorted(spring.base_model.peft_config) == expected["adapters"]
    assert len(spring.memory) == expected["memory_records"] and spring.memory.users() == expected["memory_users"]
    expected_config = SpringConfig(
        use_global=False, interpolation_weight=0.5, base_model_name_or_path=str(saved / "base")
    )
    assert spring.spring_config == expected_config  # λ as saved by 0.1 (its default then), not today's default
    input_ids = torch.tensor([expected["input_ids"]])
    assert spring.tokenizer(expected["prompt"])["input_ids"] == expected["input_ids"]
    out = spring.generate(
        input_ids, personalization=expected["user"], max_new_tokens=len(expected["tokens"]), do_sample=False,
        pad_token_id=PAD,
    )  # fmt: skip
    assert out[0, input_ids.shape[1] :].tolist() == expected["tokens"]
    spring.base_model.set_adapter("alice")
    with torch.no_grad():
        logits = spring(input_ids=input_ids).logits.double()
    assert float(logits.sum()) == pytest.approx(expected["alice_logits_sum"], rel=1e-5, abs=1e-3)
    assert float(logits.abs().sum()) == pytest.approx(expected["alice_logits_abs_sum"], rel=1e-5)


def test_memory_folder_loads(saved):
    expected = EXPECTED["memory"]
    memory = LoGoMemory.from_pretrained(saved / "memory", encoder=encoder())
    assert len(memory) == expected["records"] and memory.users() == expected["users"]
    first = memory.history("carol")[0]
    context = memory.retrieve_context("carol", first.prompt, k=1, use_global=False)
    assert [hit.interaction.id for hit in context.local_hits] == [first.id]


def test_continual_folder_loads(saved):
    expected = EXPECTED["continual"]
    model = AutoModelForCausalLM.from_pretrained(saved / "base")
    personalizer = ContinualPersonalizer.from_pretrained(
        model, saved / "continual", memory_kwargs={"encoder": encoder()}, offload_dir=str(saved.parent / "offload")
    )
    assert personalizer.users == expected["users"]
    assert {user: personalizer.period(user) for user in personalizer.users} == expected["periods"]
    assert len(personalizer.memory) == expected["memory_records"]
    assert personalizer.memory.num_buffer_items == expected["memory_buffer_items"]
    name = personalizer.load_user("alice")
    assert name in personalizer.model.peft_config and personalizer.resident_users == ["alice"]
