"""The personalization pipeline (`generation/planning.py`): the one gate rule, λ, the retrieval region, explicit
adapters, unknown users, and the logits processor built from the same plan."""

import logging

import pytest
import torch
from testing_utils import GREEDY, FakeMemory, make_adapted_model, make_model, make_tokenizer
from transformers import LogitsProcessorList

from transformers_spring.generation import Personalization, SpringConfig, SpringForCausalLM
from transformers_spring.generation.planning import gate_items
from transformers_spring.records import Interaction, MediatedContext, RetrievedItem


def hit(user, text, score, source="local"):
    return RetrievedItem(Interaction(user, text, f"{text} w1", timestamp=1e9), score, source)


class MixedMemory:
    """Returns two local and two global hits, and records the keyword arguments it was called with."""

    def __init__(self):
        self.calls = []
        self.items = [hit("alice", "cats", 3.0), hit("alice", "rain", 1.0), hit("bob", "dogs", 0.2, "global"),
                      hit("carol", "sun", 0.9, "global")]  # fmt: skip

    def retrieve_context(self, user_id, query, k=4, *, use_global=None, **kwargs):
        self.calls.append({"user_id": user_id, "k": k, "use_global": use_global, **kwargs})
        items = self.items[:k]
        return MediatedContext(items=items, weight=0.25, local_hits=items[:2], global_hits=items[2:])


def batch(texts=("cats rain sun",)):
    return make_tokenizer()(list(texts), return_tensors="pt", padding=True)


def test_gate_items_keeps_local_items_strictly_above_sigma_and_every_global_item():
    items = [hit("a", "x", 2.0), hit("a", "y", 1.0), hit("b", "z", 0.1, "global"), "plain text"]
    assert gate_items(items, None) == items
    assert gate_items(items, 1.0) == [items[0], items[2], items[3]]  # 1.0 is not strictly above 1.0
    assert gate_items(items, 5.0) == items[2:]


@pytest.mark.parametrize("where", ["config", "call"])
def test_the_gate_filters_local_hits_only_from_config_or_call(where):
    memory = MixedMemory()
    config = SpringConfig(top_k=4, gate=1.5 if where == "config" else None)
    spring = SpringForCausalLM(make_model("llama"), memory=memory, config=config, tokenizer=make_tokenizer())
    personalization = Personalization(user="alice", gate=1.5) if where == "call" else "alice"
    (row,) = spring.plan(batch()["input_ids"], personalization=personalization)
    assert [item.interaction.prompt for item in row.items] == ["cats", "dogs", "sun"]


def test_weight_rule_and_lambda_zero_skips_retrieval():
    memory = MixedMemory()
    spring = SpringForCausalLM(make_model("llama"), memory=memory, tokenizer=make_tokenizer())
    ids = batch()["input_ids"]
    assert spring.plan(ids, personalization="alice")[0].weight == 0.25  # the config's λ (the measured default)
    spring.spring_config = SpringConfig(use_memory_weight=True)
    assert spring.plan(ids, personalization="alice")[0].weight == 0.25  # the memory's suggestion
    assert spring.plan(ids, personalization=Personalization(user="alice", weight=0.75))[0].weight == 0.75
    calls = len(memory.calls)
    (row,) = spring.plan(ids, personalization=Personalization(user="alice", weight=0.0))
    assert len(memory.calls) == calls and not row.gate_open  # λ = 0: the history path is never used


def test_the_retrieval_region_reaches_the_memory_only_when_not_all():
    memory = MixedMemory()
    spring = SpringForCausalLM(make_model("llama"), memory=memory, tokenizer=make_tokenizer())
    ids = batch()["input_ids"]
    spring.plan(ids, personalization="alice")
    assert "region" not in memory.calls[-1]  # a custom memory need not know regions
    spring.spring_config = SpringConfig(retrieval_region="buffer")
    spring.plan(ids, personalization="alice")
    assert memory.calls[-1]["region"] == "buffer"
    spring.plan(ids, personalization=Personalization(user="alice", region="history"))
    assert memory.calls[-1]["region"] == "history"
    with pytest.raises(ValueError, match="region"):
        Personalization(user="alice", retrieval_kwargs={"region": "buffer"})


def test_an_explicit_adapter_is_routed_and_an_unknown_one_is_an_error():
    model = make_adapted_model()  # adapter "alice"
    spring = SpringForCausalLM(model, memory=FakeMemory({}), tokenizer=make_tokenizer())
    inputs = batch()
    own = spring.generate(**inputs, personalization=Personalization(user="alice", history=[]), **GREEDY)
    chosen = spring.generate(**inputs, personalization=Personalization(user="bob", adapter="alice", history=[]),
                             **GREEDY)  # fmt: skip
    base = spring.generate(**inputs, personalization=Personalization(user="alice", adapter="__base__", history=[]),
                           **GREEDY)  # fmt: skip
    assert torch.equal(own, chosen) and spring.last_personalization[0].adapter == "__base__"
    with model.disable_adapter():
        assert torch.equal(base, model.generate(**inputs, **GREEDY))
    with pytest.raises(ValueError, match="'carol' is not an adapter of the model"):
        spring.generate(**inputs, personalization=Personalization(user="alice", adapter="carol"), **GREEDY)
    plain = SpringForCausalLM(make_model("llama"), memory=FakeMemory({}), tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match="has no adapters"):
        plain.plan(inputs["input_ids"], personalization=Personalization(user="alice", adapter="alice"))


def test_a_user_without_an_adapter_decodes_as_the_base_and_is_logged_once(caplog):
    from transformers.utils import logging as hf_logging

    model = make_adapted_model()
    spring = SpringForCausalLM(model, memory=FakeMemory({}), tokenizer=make_tokenizer())
    hf_logging.set_verbosity_info()
    logger = hf_logging.get_logger("transformers_spring.generation.planning")
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="transformers_spring.generation.planning"):
            for _ in range(2):
                out = spring.generate(**batch(), personalization="Ed Mazza ", **GREEDY)
    finally:
        hf_logging.set_verbosity_warning()
        logger.propagate = False
    assert spring.last_personalization[0].adapter == "__base__"
    with model.disable_adapter():
        assert torch.equal(out, model.generate(**batch(), **GREEDY))
    assert sum("'Ed Mazza '" in record.getMessage() for record in caplog.records) == 1


class ListingMemory(FakeMemory):
    """A FakeMemory that can say which users it holds records of (as `LoGoMemory.users()` does)."""

    def users(self):
        return list(self.records)


@pytest.fixture
def info_logs(caplog):
    """The planner's info-level lines, through transformers' logging."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    logger = hf_logging.get_logger("transformers_spring.generation.planning")
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="transformers_spring.generation.planning"):
            yield caplog
    finally:
        hf_logging.set_verbosity_warning()
        logger.propagate = False


def test_strict_unknown_user_is_refused_with_close_matches():
    from transformers_spring.memory import HashingEncoder, LoGoMemory

    memory = LoGoMemory(HashingEncoder(32), gate=None, num_threads=1)
    memory.add_many([Interaction("Ed Mazza", "cats rain", "cats headline w1", timestamp=1e9)])
    config = SpringConfig(unknown_user="error")
    spring = SpringForCausalLM(make_adapted_model(), memory=memory, config=config, tokenizer=make_tokenizer())
    ids = batch()["input_ids"]
    with pytest.raises(ValueError, match="'Ed Mazza '") as error:
        spring.generate(**batch(), personalization=["Ed Mazza "], **GREEDY)
    message = str(error.value)
    assert "adapter 'Ed_Mazza_'" in message and "adapter_name_template '{user_id}'" in message
    assert "memory holds no record" in message and "'Ed Mazza'" in message and "unknown_user='base'" in message
    # Known to the memory (no adapter), or to the model (adapter, no record), or given an adapter: not unknown.
    assert spring.plan(ids, personalization="Ed Mazza")[0].adapter == "__base__"
    assert spring.plan(ids, personalization="alice")[0].adapter == "alice"
    spring.plan(ids, personalization=Personalization(user="Ed Maza", adapter="alice"))
    # A memory that cannot list its users is taken to know them; without a memory nobody is known.
    spring.memory = FakeMemory({})
    spring.plan(ids, personalization="carol")
    spring.memory = None
    with pytest.raises(ValueError, match="'carol'.*there is no memory"):
        spring.plan(ids, personalization=Personalization(user="carol", history=["cats"]))


def test_strict_unknown_user_on_a_model_without_adapters():
    config = SpringConfig(unknown_user="error")
    memory = ListingMemory({"alice": [("cats rain", "w1")]})
    spring = SpringForCausalLM(make_model("llama"), memory=memory, config=config, tokenizer=make_tokenizer())
    ids = batch()["input_ids"]
    spring.plan(ids, personalization="alice")
    calls = len(memory.calls)
    with pytest.raises(ValueError, match=r"'alce'.*the model has no adapters.*\['alice'\]"):
        spring.plan(ids, personalization=["alce"])
    assert len(memory.calls) == calls  # refused before anything is retrieved


def test_a_user_unknown_to_a_model_without_adapters_is_logged_once(info_logs):
    memory = ListingMemory({"alice": [("cats rain", "w1")]})
    spring = SpringForCausalLM(make_model("llama"), memory=memory, tokenizer=make_tokenizer())
    for _ in range(2):
        out = spring.generate(**batch(), personalization="alce", **GREEDY)
        spring.generate(**batch(), personalization="alice", **GREEDY)
    assert torch.equal(out, spring.base_model.generate(**batch(), **GREEDY))
    lines = [record.getMessage() for record in info_logs.records]
    assert sum("'alce'" in line for line in lines) == 1 and not any("'alice'" in line for line in lines)


def test_the_logits_processor_equals_generate_in_processor_mode():
    memory = FakeMemory({"alice": [("cats rain", "cats headline w1 w2"), ("cats sun", "w3 w4 cats")]})
    config = SpringConfig(mode="processor")
    spring = SpringForCausalLM(make_model("llama"), memory=memory, config=config, tokenizer=make_tokenizer())
    inputs = batch(["cats rain sun", "dogs"])
    expected = spring.generate(**inputs, personalization=["alice", None], **GREEDY)
    processor = spring.logits_processor(inputs["input_ids"], inputs["attention_mask"], ["alice", None])
    assert spring.last_personalization[0].gate_open
    out = spring.base_model.generate(**inputs, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    assert torch.equal(out, expected)
    adapted = SpringForCausalLM(make_adapted_model(), memory=memory, tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match="different LoRA adapters"):
        adapted.logits_processor(inputs["input_ids"], inputs["attention_mask"], ["alice", "bob"])  # bob: the base
