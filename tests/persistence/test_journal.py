"""The interaction journal of `spring serve`: durable appends, a torn last line, erasure."""

import json

import pytest

from transformers_spring.memory import Interaction
from transformers_spring.persistence.journal import InteractionJournal, read_serve_state, write_serve_state


def items(user, n, start=0):
    return [Interaction(user, f"prompt {i}", f"response {i}", timestamp=1000 + i, id=f"{user}-{i}")
            for i in range(start, start + n)]  # fmt: skip


def test_appends_are_read_back_in_order_with_their_sequence_numbers(tmp_path):
    journal = InteractionJournal(tmp_path)
    assert journal.append(items("a", 2)) == [0, 1]
    assert journal.append(items("b", 1)) == [2]
    again = InteractionJournal(tmp_path)
    assert [(s, it.id) for s, it in again.entries()] == [(0, "a-0"), (1, "a-1"), (2, "b-0")]
    assert again.entries("a")[1][1] == items("a", 2)[1]
    assert again.append(items("a", 1, 2)) == [3]


def test_a_line_cut_by_a_crash_is_dropped_and_the_next_append_is_clean(tmp_path):
    journal = InteractionJournal(tmp_path)
    journal.append(items("a", 2))
    with open(journal.path, "ab") as f:
        f.write(b'{"seq": 2, "id": "a-2", "user_')  # a crash mid-append: never acknowledged
    again = InteractionJournal(tmp_path)
    assert [it.id for _, it in again.entries()] == ["a-0", "a-1"]
    again.append(items("a", 1, 5))
    assert [json.loads(line)["id"] for line in journal.path.read_text().splitlines()] == ["a-0", "a-1", "a-5"]


def test_a_damaged_line_before_the_end_is_an_error_naming_the_line(tmp_path):
    journal = InteractionJournal(tmp_path)
    journal.append(items("a", 3))
    lines = journal.path.read_text().splitlines()
    lines[1] = "garbage"
    journal.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2 is damaged"):
        InteractionJournal(tmp_path)


def test_forget_user_rewrites_the_journal_without_the_user(tmp_path):
    journal = InteractionJournal(tmp_path)
    journal.append(items("a", 2) + items("b", 2))
    assert journal.forget_user("a") == 2
    assert "a-" not in journal.path.read_text()
    assert [it.id for _, it in InteractionJournal(tmp_path).entries()] == ["b-0", "b-1"]
    assert journal.forget_user("nobody") == 0


def test_serve_state_round_trip_and_errors(tmp_path):
    assert read_serve_state(tmp_path) == {}
    write_serve_state(tmp_path, {"initial_observed": {"a": 3}})
    assert read_serve_state(tmp_path) == {"initial_observed": {"a": 3}}
    (tmp_path / "serve.json").write_text("[1]")
    with pytest.raises(ValueError, match="serve.json must hold a JSON object"):
        read_serve_state(tmp_path)


def test_a_recorded_id_is_refused_and_a_failed_write_leaves_no_cut_line(tmp_path, monkeypatch):
    journal = InteractionJournal(tmp_path)
    journal.append(items("a", 1))
    with pytest.raises(KeyError, match="a-0"):
        journal.append(items("a", 1))
    assert journal.holds("a", "a-0") and not journal.holds("b", "a-0")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError):
        journal.append(items("a", 1, 1))
    monkeypatch.undo()
    journal.append(items("a", 1, 2))
    assert [it.id for _, it in InteractionJournal(tmp_path).entries()] == ["a-0", "a-2"]
