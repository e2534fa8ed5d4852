"""The `personalization=` argument: `normalize_personalization` (one entry per row from a str, a Personalization, a
dict or a list of those), `Personalization`'s validation, and `RowPersonalization.gate_open`."""

import pytest

from transformers_spring.generation import Personalization, RowPersonalization
from transformers_spring.generation.personalization import normalize_personalization
from transformers_spring.records import Interaction


def test_a_user_id_personalises_every_row():
    rows = normalize_personalization("alice", 3)
    assert rows == [Personalization(user="alice")] * 3


def test_none_and_inactive_entries_are_no_personalization():
    assert normalize_personalization(None, 2) == [None, None]
    assert normalize_personalization(Personalization(), 2) == [None, None]  # neither user nor history
    assert normalize_personalization({"weight": 0.3}, 1) == [None]


def test_a_list_has_one_entry_per_row():
    explicit = Personalization(user="bob", weight=0.7, top_k=1)
    rows = normalize_personalization(["alice", None, explicit, {"user": "carol", "gate": 1.5}], 4)
    assert rows[0] == Personalization(user="alice")
    assert rows[1] is None
    assert rows[2] is explicit
    assert rows[3] == Personalization(user="carol", gate=1.5)
    assert normalize_personalization(("alice", "bob"), 2) == [Personalization("alice"), Personalization("bob")]


def test_a_dict_is_a_personalization():
    history = [Interaction("alice", "cats", "w1")]
    (row,) = normalize_personalization({"history": history, "query": "cats", "retrieval_kwargs": {"before": 5}}, 1)
    assert row == Personalization(history=history, query="cats", retrieval_kwargs={"before": 5})
    assert row.is_active and row.user is None  # explicit history without a user is active


@pytest.mark.parametrize("value", [["alice"], ["alice", "bob", None], []])
def test_wrong_length_names_both_sizes(value):
    with pytest.raises(ValueError, match=rf"{len(value)} entries but the batch has 2 row"):
        normalize_personalization(value, 2)


@pytest.mark.parametrize(
    "value, where",
    [(42, "`personalization`"), (3.5, "`personalization`"), ({"alice"}, "`personalization`"),
     (["alice", 7], "`personalization\\[1\\]`"), ([["alice"], None], "`personalization\\[0\\]`")],
)  # fmt: skip
def test_wrong_type_names_the_entry(value, where):
    with pytest.raises(TypeError, match=where):
        normalize_personalization(value, 2 if isinstance(value, list) else 1)


def test_unknown_dict_keys_are_named():
    with pytest.raises(TypeError, match=r"personalization\[0\].*colour"):
        normalize_personalization([{"user": "alice", "colour": 1}, None], 2)
    with pytest.raises(TypeError, match="unknown key"):
        normalize_personalization({"user_id": "alice"}, 1)


@pytest.mark.parametrize(
    "entry, error, field",
    [
        ("  ", ValueError, "`Personalization.user` must be a non-empty str"),
        ({"user": ""}, ValueError, "`Personalization.user` must be a non-empty str"),
        ({"user": "dave", "weight": 2}, ValueError, "`Personalization.weight` must be"),
        ({"user": "dave", "top_k": "3"}, TypeError, "`Personalization.top_k` must be"),
        ({"user": "dave", 2: 1, "colour": 1}, TypeError, r"has unknown key\(s\) \[2, .colour.\]"),
    ],
)
def test_a_bad_field_in_a_list_names_the_row(entry, error, field):
    """One bad row among several is named by its index, whatever the check that refuses it."""
    with pytest.raises(error, match=r"^`personalization\[3\]`:? " + field):
        normalize_personalization(["alice", None, "bob", entry], 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"user": ""}, ValueError, "Personalization.user"),
        ({"user": "  "}, ValueError, "Personalization.user"),
        ({"user": 3}, ValueError, "Personalization.user"),
        ({"query": 3}, TypeError, "Personalization.query"),
        ({"weight": 1.5}, ValueError, "Personalization.weight"),
        ({"weight": "high"}, TypeError, "Personalization.weight"),
        ({"top_k": 0}, ValueError, "Personalization.top_k"),
        ({"top_k": True}, TypeError, "Personalization.top_k"),
        ({"gate": "sometimes"}, TypeError, "Personalization.gate"),
        ({"history": "cats rain"}, TypeError, "Personalization.history"),
        ({"history": Interaction("alice", "cats", "w1")}, TypeError, "Personalization.history"),
        ({"retrieval_kwargs": ["before"]}, TypeError, "retrieval_kwargs"),
        ({"retrieval_kwargs": {"k": 3}}, ValueError, "retrieval_kwargs"),
        ({"retrieval_kwargs": {"user_id": "bob"}}, ValueError, "dedicated fields"),
    ],
)
def test_bad_fields_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        Personalization(**kwargs)
    if "user" not in kwargs:  # the same through a dict entry
        with pytest.raises(error, match=match):
            normalize_personalization({"user": "alice", **kwargs}, 1)


def test_fields_are_normalised():
    row = Personalization(user="alice", weight=1, gate=2, history=("w1", "w2"))
    assert row.weight == 1.0 and isinstance(row.weight, float)
    assert row.gate == 2.0 and row.history == ["w1", "w2"]
    assert Personalization(history=[]).is_active  # an empty history is active: it closes the gate


def test_row_gate_open_needs_items_and_a_positive_weight():
    assert not RowPersonalization(user="alice").gate_open
    assert not RowPersonalization(user="alice", items=["w1"], weight=0.0).gate_open
    assert not RowPersonalization(user="alice", items=[], weight=0.5).gate_open
    assert RowPersonalization(user="alice", items=["w1"], weight=0.5).gate_open
