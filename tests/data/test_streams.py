"""`group_by_user`: users in order of first appearance, each user's items in stream order (or newest first)."""

from transformers_spring.data import group_by_user
from transformers_spring.memory import Interaction


def stream():
    rows = [("bob", 1), ("alice", 2), ("bob", 3), ("carol", 4), ("alice", 5)]
    return [Interaction(user, f"p{t}", f"r{t}", timestamp=1e9 + t, id=f"{user}-{t}") for user, t in rows]


def test_users_in_order_of_first_appearance():
    groups = group_by_user(stream())
    assert list(groups) == ["bob", "alice", "carol"]
    assert {user: [item.id for item in items] for user, items in groups.items()} == {
        "bob": ["bob-1", "bob-3"], "alice": ["alice-2", "alice-5"], "carol": ["carol-4"]
    }  # fmt: skip


def test_newest_first_reverses_each_list_only():
    items = stream()
    groups = group_by_user(iter(items), newest_first=True)  # any iterable
    assert list(groups) == ["bob", "alice", "carol"]
    assert [item.id for item in groups["alice"]] == ["alice-5", "alice-2"]
    assert [item.id for item in items] == ["bob-1", "alice-2", "bob-3", "carol-4", "alice-5"]  # input untouched


def test_empty_stream():
    assert group_by_user([]) == {}
