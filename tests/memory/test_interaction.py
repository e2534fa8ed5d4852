import datetime as dt
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
