import datetime as dt
import json
import math

import pytest

from transformers_spring.memory import Interaction


def test_defaults_and_text():
    item = Interaction("alice", "q", "a")
    assert item.id and isinstance(item.timestamp, float) and item.metadata == {}
    assert item.text == "q\na"
    assert Interaction.from_dict(item.to_dict()) == item


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"response": None}, "response"),
        ({"response": ["a"]}, "response"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": None}, "user_id"),
        ({"user_id": " bob"}, "user_id"),
        ({"timestamp": math.nan}, "timestamp"),
        ({"timestamp": math.inf}, "timestamp"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": 10**400}, "timestamp"),  # (past float's range: an OverflowError before)
        ({"metadata": {1: "x"}}, "metadata"),  # (JSON would bring it back as "1")
        ({"metadata": {"x": object()}}, "metadata"),
        ({"metadata": "tag"}, "metadata"),
        ({"prompt": "x" * 20_001}, "prompt"),
        ({"id": ""}, "id"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    args = {"user_id": "alice", "prompt": "q", "response": "a", **kwargs}
    with pytest.raises((TypeError, ValueError), match=field):
        Interaction(**args)


def test_timestamps_are_normalised():
    day = Interaction("a", "q", "r", timestamp="2022-09-23").timestamp
    assert day == Interaction("a", "q", "r", timestamp=dt.date(2022, 9, 23)).timestamp
    assert day == dt.datetime(2022, 9, 23, tzinfo=dt.UTC).timestamp()


def test_from_dict_names_missing_fields():
    with pytest.raises(ValueError, match="response"):
        Interaction.from_dict({"user_id": "a", "prompt": "q"})


# -------------------------------------------------------------- hostile input (issue: safe by construction)
SURROGATE = json.loads('"\\udc80"')


@pytest.mark.parametrize("field", ["user_id", "prompt", "response", "id", "metadata"])
def test_a_lone_surrogate_is_refused_naming_the_field(field):
    kwargs = dict(user_id="u", prompt="p", response="r", id="i1", metadata={})
    kwargs[field] = {"note": f"x{SURROGATE}"} if field == "metadata" else f"x{SURROGATE}"
    with pytest.raises(ValueError, match=f"`{field}`.*surrogate|`{field}` must be JSON-serialisable as UTF-8"):
        Interaction(**kwargs)


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "a\x00b", "tab\there", "..", ".", "x" * 257, " pad"])
@pytest.mark.parametrize("field", ["user_id", "id"])
def test_ids_are_names_not_paths(bad, field):
    kwargs = dict(user_id="u", prompt="p", response="r", id="i1")
    kwargs[field] = bad
    with pytest.raises(ValueError, match=f"`{field}`"):
        Interaction(**kwargs)
    assert Interaction(**{**kwargs, field: "x" * 256}).__getattribute__(field) == "x" * 256


def test_text_needs_a_visible_character():
    with pytest.raises(ValueError, match="`prompt` has no visible character"):
        Interaction("u", "\u200b\u200b \u200d", "r")
    with pytest.raises(ValueError, match="`response`"):
        Interaction("u", "p", "\u00a0\u2028")
    assert Interaction("u", "\u200bok", "é").prompt == "\u200bok"


@pytest.mark.parametrize("text", [" \t\n\r", "\x01\x02", "\x7f", " \x1f "])
def test_ascii_text_without_a_visible_character_is_refused(text):
    # ASCII takes a fast path (a regex, not a category per character): it must refuse exactly what the slow one does
    with pytest.raises(ValueError, match="`prompt` has no visible character"):
        Interaction("u", text, "r")
    assert Interaction("u", text + "~", "r").prompt.endswith("~")


def test_stored_records_cannot_change():
    import dataclasses

    item = Interaction("alice", "p", "r", metadata={"tags": ["a"], "nested": {"k": 1}})
    for field, value in (("user_id", "bob"), ("prompt", "x"), ("timestamp", float("nan"))):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(item, field, value)
    with pytest.raises(TypeError, match="read-only"):
        item.metadata["tags"] = []
    with pytest.raises(TypeError, match="read-only"):
        item.metadata["tags"].append("b")
    with pytest.raises(TypeError, match="read-only"):
        item.metadata["nested"]["k"] = 2
    assert item.metadata == {"tags": ["a"], "nested": {"k": 1}}
    plain = item.to_dict()["metadata"]
    plain["tags"].append("b")  # to_dict hands out a plain copy
    assert item.metadata["tags"] == ["a"]
    changed = dataclasses.replace(item, user_id="bob")
    assert changed.user_id == "bob" and item.user_id == "alice"
    source = {"tags": ["a"]}
    copy = Interaction("u", "p", "r", metadata=source)
    source["tags"].append("b")  # the caller's dict is not the stored one
    assert copy.metadata == {"tags": ["a"]}


def test_a_repeated_id_names_both_records():
    from transformers_spring.records import coerce_interactions

    batch = [Interaction("a" if i % 2 else "b", f"p{i}", "r", id=f"x{i}") for i in range(9)]
    batch[7] = Interaction("a", "again", "r", id="x3")  # batch[3] is user a's x3
    with pytest.raises(ValueError) as info:
        coerce_interactions(batch)
    assert str(info.value) == (
        "`interactions[7]`: `id` 'x3' repeats `interactions[3]` (user 'a'); a user's ids must be unique."
    )
    batch[7] = Interaction("b", "again", "r", id="x3")  # another user's id: no clash
    assert coerce_interactions(batch) == batch
    with pytest.raises(ValueError, match=r"^`train_interactions\[1\]`: `id` 'x0' repeats `train_interactions\[0\]`"):
        coerce_interactions([batch[0], batch[0]], "b", "train_interactions")
