import logging as std_logging

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_interactions, make_tokenizer

from transformers_spring.memory import Interaction
from transformers_spring.records import coerce_interactions
from transformers_spring.training import SpringDataCollator, SpringDataset, SpringFormatter
from transformers_spring.training.data import IGNORE_INDEX


def test_chat_prompt_is_exactly_the_generation_prompt(tokenizer):
    item = Interaction("alice", "cats rain w1", "w2 w3", id="a")
    formatter = SpringFormatter(tokenizer, prompt_template="write a headline for {prompt}")
    sample = formatter.encode(item)
    messages = [{"role": "user", "content": "write a headline for cats rain w1"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(sample.input_ids[: sample.prompt_length]) == list(expected)
    response = tokenizer.convert_ids_to_tokens(list(sample.input_ids[sample.prompt_length :]))
    assert response == ["w2", "w3", "<|im_end|>"]  # the end-of-turn marker is learned, the trailing newline is not


def test_system_prompt_and_plain_format():
    item = Interaction("alice", "cats", "w1", id="a")
    chat = SpringFormatter(make_tokenizer(TRAINING_VOCAB, chat=True), system_prompt="w9")
    assert "system" in chat.prompt_text(item)
    plain = SpringFormatter(make_tokenizer(TRAINING_VOCAB))
    sample = plain.encode(item)
    tokens = plain.tokenizer.convert_ids_to_tokens(list(sample.input_ids))
    assert tokens == ["cats", "w1", "</s>"] and sample.prompt_length == 1


def test_long_prompt_is_cut_from_the_left(tokenizer):
    item = Interaction("alice", " ".join(f"w{i}" for i in range(40)), "w1 w2", id="a")
    sample = SpringFormatter(tokenizer, max_length=12).encode(item)
    assert len(sample.input_ids) == 12 and sample.truncated
    tokens = tokenizer.convert_ids_to_tokens(list(sample.input_ids))
    assert tokens[-3:] == ["w1", "w2", "<|im_end|>"]  # the response is whole
    assert tokens[-6:-3] == ["<|im_start|>", "assistant", ":"]  # the end of the prompt (generation prompt) is kept
    assert tokens[0] != "<|im_start|>"  # the start is what was cut


def test_response_longer_than_max_length_is_cut_with_a_warning(tokenizer, caplog):
    item = Interaction("alice", "cats", " ".join(f"w{i}" for i in range(30)), id="long")
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level(std_logging.WARNING):
            sample = SpringFormatter(tokenizer, max_length=10).encode(item)
    finally:
        logging.disable_propagation()
    assert len(sample.input_ids) == 10 and sample.prompt_length == 1 and sample.truncated
    assert tokenizer.convert_ids_to_tokens(list(sample.input_ids[1:3])) == ["w0", "w1"]
    assert "long" in caplog.text and "max_length" in caplog.text


def test_cache_key_changes_with_text_and_layout(tokenizer):
    item = Interaction("alice", "cats", "w1", id="a")
    key = SpringFormatter(tokenizer).encode(item).cache_key
    assert key == SpringFormatter(tokenizer).encode(item).cache_key
    assert key != SpringFormatter(tokenizer).encode(Interaction("alice", "cats", "w2", id="a")).cache_key
    assert key != SpringFormatter(tokenizer, prompt_template="write {prompt}").encode(item).cache_key
    assert key != SpringFormatter(tokenizer).encode(Interaction("bob", "cats", "w1", id="a")).cache_key


def test_dataset_and_collator(tokenizer):
    formatter = SpringFormatter(tokenizer)
    samples = formatter.encode_many(make_interactions("alice", 3))
    dataset = SpringDataset(samples)
    batch = SpringDataCollator(pad_token_id=0)([dataset[i] for i in range(3)])
    longest = max(len(s.input_ids) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, sample in enumerate(samples):
        n, p = len(sample.input_ids), sample.prompt_length
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, :p] == IGNORE_INDEX).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][row, p:n], torch.tensor(sample.input_ids[p:]))
    full = SpringDataCollator()([SpringDataset(samples, response_only_loss=False)[0]])
    assert full["labels"][0, 0] == IGNORE_INDEX and (full["labels"][0, 1:] != IGNORE_INDEX).all()


def test_coerce_interactions_errors_name_the_field():
    good = make_interactions("alice", 2)
    assert coerce_interactions(good, "alice") == good
    assert coerce_interactions([{"user_id": "alice", "prompt": "p", "response": "r", "id": "x"}], "alice")[0].id == "x"
    with pytest.raises(ValueError, match=r"interactions\[0\].*missing.*response"):
        coerce_interactions([{"user_id": "alice", "prompt": "p"}], "alice")
    with pytest.raises(TypeError, match=r"interactions\[1\]"):
        coerce_interactions([good[0], "text"], "alice")
    with pytest.raises(TypeError, match=r"prompt"):
        coerce_interactions([{"user_id": "alice", "prompt": 3, "response": "r"}], "alice")
    with pytest.raises(ValueError, match=r"user_id.*bob"):
        coerce_interactions(good, "bob")
    with pytest.raises(ValueError, match="`id`"):
        coerce_interactions([good[0], good[0]], "alice")
    with pytest.raises(TypeError, match="interactions"):
        coerce_interactions(None, "alice")
    with pytest.raises(TypeError, match="interactions"):
        coerce_interactions("alice said hi", "alice")
    item = make_interactions("alice", 1)[0]
    object.__setattr__(item, "response", "")  # changed behind the frozen dataclass's back
    with pytest.raises(ValueError, match="response"):
        coerce_interactions([item], "alice")
