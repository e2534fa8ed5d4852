"""`HistoryPromptBuilder` and `render_item`: where the history block goes (inside the last user turn with a chat
template, after BOS without one), the retrieval query, the templates and the token budget."""

import logging as std_logging

import pytest
from testing_utils import make_tokenizer

from transformers_spring.generation import HistoryPromptBuilder, SpringConfig
from transformers_spring.generation.prompting import render_item
from transformers_spring.records import Interaction, RetrievedItem

TEMPLATES = {"retrieval_template": "history : {history} ;", "history_item_template": "{response}"}


def builder_for(tokenizer, **kwargs):
    return HistoryPromptBuilder(tokenizer, SpringConfig(**{**TEMPLATES, **kwargs}))


# ------------------------------------------------------------------------------------------------ rendering
def test_render_item_placeholders():
    item = Interaction("alice", "cats rain", "w1 w2", timestamp=1e9)
    template = "{user_id} | {prompt} | {response} | {source} | {score}"
    assert render_item(item, template) == "alice | cats rain | w1 w2 | local | nan"
    assert render_item(RetrievedItem(item, 1.5, "global"), template) == "alice | cats rain | w1 w2 | global | 1.5"
    assert render_item(item, "{text}") == "cats rain\nw1 w2"
    assert render_item("already rendered", template) == "already rendered"
    with pytest.raises(TypeError, match="history item"):
        render_item({"prompt": "cats"}, template)


# ------------------------------------------------------------------------------------------------ with a chat template
def test_history_goes_inside_the_last_user_turn(chat_tokenizer):
    config = SpringConfig(retrieval_template="history : {history} ;", history_item_template="{prompt} : {response}")
    builder = HistoryPromptBuilder(chat_tokenizer, config)
    messages = [
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "w3"},
        {"role": "user", "content": "cats rain"},
    ]
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert builder.query_text(ids) == "cats rain"
    items = [Interaction("alice", "dogs", "vote")]
    expected = chat_tokenizer.apply_chat_template(
        messages[:2] + [{"role": "user", "content": "history : dogs : vote ; cats rain"}],
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert builder.build(ids, items) == expected


def test_chat_layout_is_learned_from_the_template(chat_tokenizer):
    builder = builder_for(chat_tokenizer)
    assert builder.user_header_ids == chat_tokenizer.convert_tokens_to_ids(["<|im_start|>", "user", ":"])
    assert builder.generation_suffix.split() == ["<|im_end|>", "<|im_start|>", "assistant", ":"]
    messages = [{"role": "user", "content": "cats rain"}]
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert builder.insertion_index(ids) == 3  # right after "<|im_start|> user :"
    built = builder.build(ids, ["w1 w2"])
    assert chat_tokenizer.decode(built).split() == (
        "<|im_start|> user : history : w1 w2 ; cats rain <|im_end|> <|im_start|> assistant :".split()
    )


def test_prefix_insertion_ignores_the_chat_template(chat_tokenizer):
    builder = builder_for(chat_tokenizer, chat_insertion="prefix")
    assert builder.user_header_ids is None
    messages = [{"role": "user", "content": "cats rain"}]
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    built = builder.build(ids, ["w1"])
    assert built[: len(built) - len(ids)] == chat_tokenizer("history : w1 ;", add_special_tokens=False)["input_ids"]
    assert built[len(built) - len(ids) :] == ids


def test_prompt_without_the_user_header_gets_the_block_first(chat_tokenizer):
    builder = builder_for(chat_tokenizer)
    ids = chat_tokenizer("cats rain", add_special_tokens=False)["input_ids"]  # not chat-formatted
    assert builder.insertion_index(ids) == 0
    assert chat_tokenizer.decode(builder.build(ids, ["w1"])) == "history : w1 ; cats rain"


def test_a_template_that_cannot_render_falls_back_to_prefix_insertion(caplog):
    from transformers.utils import logging

    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('a system message is required') }}"
    logging.enable_propagation()
    try:
        with caplog.at_level(std_logging.WARNING):
            builder = builder_for(tokenizer)
    finally:
        logging.disable_propagation()
    assert builder.user_header_ids is None and "chat template" in caplog.text
    ids = tokenizer("<s> cats", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(builder.build(ids, ["w1"])) == "<s> history : w1 ; cats"


# ------------------------------------------------------------------------------------------------ without one
def test_history_without_chat_template_goes_after_bos(tokenizer):
    config = SpringConfig(retrieval_template="history : {history} ;", history_item_template="{response}")
    builder = HistoryPromptBuilder(tokenizer, config)
    ids = tokenizer("<s> cats rain", add_special_tokens=False)["input_ids"]
    assert builder.query_text(ids) == "cats rain"
    built = builder.build(ids, [Interaction("alice", "dogs", "vote")])
    assert tokenizer.decode(built) == "<s> history : vote ; cats rain"


def test_without_bos_the_block_goes_first_and_items_are_separated(tokenizer):
    builder = builder_for(tokenizer, history_separator=" ; ")
    ids = tokenizer("cats rain", add_special_tokens=False)["input_ids"]
    assert builder.insertion_index(ids) == 0
    items = [RetrievedItem(Interaction("alice", "p", "w1"), 2.0, "local"), Interaction("bob", "p", "w2"), "w3"]
    assert tokenizer.decode(builder.build(ids, items)) == "history : w1 ; w2 ; w3 ; cats rain"
    assert builder.query_text(tokenizer("<s> cats </s>", add_special_tokens=False)["input_ids"]) == "cats"


def test_no_items_leave_the_prompt_unchanged(tokenizer):
    builder = builder_for(tokenizer)
    ids = tokenizer("<s> cats rain", add_special_tokens=False)["input_ids"]
    assert builder.history_block_ids([]) == []
    built = builder.build(ids, [])
    assert built == ids and built is not ids


# ------------------------------------------------------------------------------------------------ budget
def test_history_token_budget(tokenizer):
    config = SpringConfig(retrieval_template="history : {history} ;", history_item_template="{response}")
    items = [Interaction("a", "p", "w1 w2 w3"), Interaction("a", "p", "w4 w5 w6")]
    builder = HistoryPromptBuilder(tokenizer, SpringConfig(**{**config.to_dict(), "max_history_tokens": 8}))
    assert tokenizer.decode(builder.history_block_ids(items)) == "history : w1 w2 w3 ;"  # the second does not fit
    builder = HistoryPromptBuilder(tokenizer, SpringConfig(**{**config.to_dict(), "max_history_tokens": 5}))
    assert tokenizer.decode(builder.history_block_ids(items)) == "history : w1 w2 ;"  # the first is cut
    assert builder.history_block_ids([]) == []


def test_budget_keeps_whole_items_in_retrieval_order(tokenizer):
    items = ["w1 w2", "w3", "w4 w5 w6", "w7"]
    # "history : w1 w2 w3 ;" is 6 tokens; adding "w4 w5 w6" would need 9, so it stops there (no skipping ahead)
    builder = builder_for(tokenizer, history_separator=" ", max_history_tokens=8)
    assert tokenizer.decode(builder.history_block_ids(items)) == "history : w1 w2 w3 ;"
    builder = builder_for(tokenizer, history_separator=" ", max_history_tokens=512)
    assert tokenizer.decode(builder.history_block_ids(items)) == "history : w1 w2 w3 w4 w5 w6 w7 ;"


def test_budget_below_the_template_means_no_history(tokenizer):
    builder = builder_for(tokenizer, max_history_tokens=3)  # "history : ;" alone takes the 3 tokens
    ids = tokenizer("<s> cats", add_special_tokens=False)["input_ids"]
    assert builder.history_block_ids(["w1"]) == []
    assert builder.build(ids, ["w1"]) == ids
