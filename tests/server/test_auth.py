"""API keys: parsing, binding, errors naming the field."""

import json

import pytest

from transformers_spring.server import ApiKeys
from transformers_spring.server.auth import ENV_VAR


def test_keys_are_bound_to_users_or_admin():
    keys = ApiKeys.parse(json.dumps({"keys": [{"key": "k" * 16, "users": ["alice"]}, {"key": "a" * 16, "admin": True}]}),
                         "keys.json")  # fmt: skip
    alice, admin = keys.get("k" * 16), keys.get("a" * 16)
    assert alice.may_act_for("alice") and not alice.may_act_for("bob")
    assert admin.may_act_for("bob") and admin.admin
    assert keys.get("x" * 16) is None and keys.get("") is None


@pytest.mark.parametrize(
    "data, message",
    [
        ("{", "not valid JSON"),
        ({"keys": {}}, "field 'keys'"),
        ({"keys": [{"key": "short", "users": ["a"]}]}, r"keys\[0\].key"),
        ({"keys": [{"key": "k" * 16}]}, "bound to no user"),
        ({"keys": [{"key": "k" * 16, "users": ["a"], "role": "x"}]}, "unknown field"),
        ({"keys": [{"key": "k" * 16, "users": "a"}]}, r"keys\[0\].users"),
        ({"keys": [{"key": "k" * 16, "users": ["a"]}, {"key": "k" * 16, "admin": True}]}, "listed twice"),
    ],
)
def test_bad_key_files_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        ApiKeys.parse(data if isinstance(data, str) else json.dumps(data), "keys.json")


def test_keys_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert ApiKeys.load() is None
    monkeypatch.setenv(ENV_VAR, json.dumps({"keys": [{"key": "e" * 16, "admin": True}]}))
    assert ApiKeys.load().get("e" * 16).admin
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "f" * 16, "users": ["a"]}]}))
    assert ApiKeys.load(path).get("f" * 16) is not None
