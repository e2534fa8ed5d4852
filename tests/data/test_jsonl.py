"""Interaction JSON Lines: round trip, error messages, atomic writes."""

import json

import pytest

from transformers_spring.data import read_interactions_jsonl, write_interactions_jsonl
from transformers_spring.memory import Interaction


def sample():
    return [
        Interaction("bob", "later", "B", timestamp=200.5, id="2", metadata={"k": [1, "x"]}),
        Interaction("ana", "Zürich – naïve “quotes”", "A\nline two", timestamp=100.0, id="1"),
        Interaction("ana", "same time", "C", timestamp=200.5, id="3"),
    ]


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "stream.jsonl"
    assert write_interactions_jsonl(sample(), path) == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert list(json.loads(lines[0])) == ["user_id", "prompt", "response", "timestamp", "id", "metadata"]
    assert "Zürich" in lines[1]  # UTF-8, not \u escapes
    back = read_interactions_jsonl(path)
    # Oldest first; equal times keep file order.
    assert [item.id for item in back] == ["1", "2", "3"]
    by_id = {item.id: item for item in back}
    for item in sample():
        assert by_id[item.id].to_dict() == item.to_dict()


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "stream.jsonl"
    write_interactions_jsonl(sample(), path)
    write_interactions_jsonl(sample()[:1], path)  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["stream.jsonl"]
    assert len(read_interactions_jsonl(path)) == 1


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "stream.jsonl"
    write_interactions_jsonl(sample(), path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="Interaction"):
        write_interactions_jsonl([sample()[0], {"user_id": "x"}], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["stream.jsonl"]


def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_blank_lines_custom_fields_and_defaults(tmp_path):
    path = write_lines(
        tmp_path / "custom.jsonl",
        [
            {"author": 7, "q": "question", "a": "answer", "date": "2020-01-02"},
            "",
            "   ",
            {"author": "x", "q": "q2", "a": "a2", "date": 5, "meta": {"tag": 1}, "uid": "u-1"},
        ],
    )
    items = read_interactions_jsonl(
        path,
        user_field="author",
        prompt_field="q",
        response_field="a",
        timestamp_field="date",
        id_field="uid",
        metadata_field="meta",
    )
    assert [(i.user_id, i.id, i.metadata) for i in items] == [("x", "u-1", {"tag": 1}), ("7", "custom-1", {})]


def test_without_timestamps_file_order_is_kept(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [{"user_id": "u", "prompt": f"p{i}", "response": "r"} for i in range(3)])
    items = read_interactions_jsonl(path, timestamp_field=None)
    assert [i.prompt for i in items] == ["p0", "p1", "p2"]
    assert [i.timestamp for i in items] == [1.0, 2.0, 3.0]


GOOD = {"user_id": "u", "prompt": "p", "response": "r", "timestamp": 1.0}


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"user_id": "u", "response": "r", "timestamp": 1.0}, r"line 2: missing field 'prompt'"),
        ({"user_id": "u", "prompt": "p", "response": "r"}, r"line 2: missing field 'timestamp'"),
        ({**GOOD, "prompt": "   "}, r"line 2: invalid field 'prompt'"),
        ({**GOOD, "timestamp": "yesterday"}, r"line 2: invalid field 'timestamp'"),
        ({**GOOD, "metadata": [1, 2]}, r"line 2: invalid field 'metadata'"),
        ({**GOOD, "user_id": " u"}, r"line 2: invalid field 'user_id'"),
        ([1, 2], r"line 2: expected a JSON object"),
        ('{"user_id": "u", "prompt": "p"', r"line 2: not valid JSON"),
        ('{"user_id": "u", "prompt": "p", "response": "r", "timestamp": NaN}', r"line 2: not valid JSON"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, bad, pattern):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(ValueError, match=pattern) as info:
        read_interactions_jsonl(path)
    assert "bad.jsonl" in str(info.value)


def test_remapped_field_is_named_as_in_the_file(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"user_id": "u", "text": "", "response": "r", "timestamp": 1}])
    with pytest.raises(ValueError, match=r"line 1: invalid field 'text'"):
        read_interactions_jsonl(path, prompt_field="text")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_interactions_jsonl(tmp_path / "nope.jsonl")


def test_a_repeated_id_of_one_user_names_both_lines(tmp_path):
    path = tmp_path / "stream.jsonl"
    rows = [{"user_id": u, "prompt": "p", "response": "r", "timestamp": i, "id": i_d}
            for i, (u, i_d) in enumerate([("a", "x"), ("b", "x"), ("a", "y"), ("a", "x")])]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"stream.jsonl, line 4: field 'id' 'x' repeats line 1 \(user 'a'\)"):
        read_interactions_jsonl(path)
