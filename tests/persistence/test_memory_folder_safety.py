"""Loading a memory folder someone else wrote is as safe as loading safetensors (issue 26): every hostile
`config.json`, `records.jsonl` or `embeddings.safetensors` is refused with a `ValueError` naming the file and the
field or line, before anything is restored, and an oversized `records.jsonl` is refused without being read whole."""

import json
import struct
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from testing_utils import edit_memory_config, populated, topical

from transformers_spring.memory import Interaction, LoGoMemory


@pytest.fixture
def saved(make_memory, tmp_path):
    """A folder with shared records, an opted-out user, a scored buffer, gate scores and community state."""
    memory = populated(make_memory, use_global=True, users=4, per_user=4, gate="auto")
    memory.set_sharing("u3", False)
    memory.set_buffer("u1", [topical("u1", "cats", 77)], scores=[1.0])
    memory.retrieve_context("u0", "kitten purr")  # gate scores with an owner, and communities
    target = tmp_path / "mem"
    memory.save_pretrained(target)
    return target


# ------------------------------------------------------------------------------------------------------ editors
def _lines(target):
    return [json.loads(line) for line in (target / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def _write_lines(target, lines):
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (target / "records.jsonl").write_text(text, encoding="utf-8")


def _edit_line(number, edit):
    """Edits line `number` (1-based) of records.jsonl: `edit(lines, line)` changes the dict or returns a raw str."""

    def corrupt(target):
        lines = _lines(target)
        new = edit(lines, lines[number - 1])
        if new is not None:
            lines[number - 1] = new
        _write_lines(target, lines)

    return corrupt


def _edit_config(**changes):
    return lambda target: edit_memory_config(target, **changes)


def _edit_tensors(edit):
    def corrupt(target):
        tensors = load_file(str(target / "embeddings.safetensors"))
        edit(tensors)
        save_file(tensors, str(target / "embeddings.safetensors"))

    return corrupt


def _set_row(name, row, value):
    def edit(tensors):
        array = tensors[name].copy()
        array[row] = value
        tensors[name] = array

    return edit


def _drop_last_record(target):
    lines = _lines(target)
    _write_lines(target, lines[:-1])


def _extra_record(target):
    lines = _lines(target)
    _write_lines(target, [*lines, dict(lines[0], id="extra")])


def _truncate(target):
    path = target / "embeddings.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _huge_header(target):
    path = target / "embeddings.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])


def _invalid_utf8(target):
    data = (target / "records.jsonl").read_bytes().split(b"\n")
    data[1] = data[1].replace(b'"prompt": "', b'"prompt": "\xff\xfe', 1)
    (target / "records.jsonl").write_bytes(b"\n".join(data))


def _hostile_header(target):
    """A header that claims 2**40 rows for 4 bytes of data (a load must not allocate for it)."""
    raw = json.dumps(
        {
            "embeddings": {"dtype": "F32", "shape": [2**40, 32], "data_offsets": [0, 4]},
            "labels": {"dtype": "I64", "shape": [0], "data_offsets": [4, 4]},
        }
    ).encode()
    (target / "embeddings.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)


# name: (corrupt(target), the file, a regex the message must also match)
HOSTILE = {
    # records.jsonl
    "non-object line": (_edit_line(2, lambda lines, line: "[1, 2, 3]"), "records.jsonl", "line 2"),
    "missing field": (
        _edit_line(3, lambda lines, line: line.pop("prompt") and None),
        "records.jsonl",
        "line 3.*prompt",
    ),
    "wrong type": (_edit_line(2, lambda lines, line: line.update(prompt=5)), "records.jsonl", "line 2.*prompt"),
    "duplicate id": (_edit_line(2, lambda lines, line: line.update(id=lines[0]["id"])), "records.jsonl", "line 2.*id"),
    "unknown user": (
        _edit_line(4, lambda lines, line: line.update(user_id="mallory")),
        "records.jsonl",
        "line \\d+.*user_id.*counts.users",
    ),
    "invalid UTF-8": (_invalid_utf8, "records.jsonl", "line 2.*UTF-8"),
    "line over the cap": (_edit_line(3, lambda lines, line: "x" * (2**20 + 5)), "records.jsonl", "line 3"),
    "unknown region": (_edit_line(2, lambda lines, line: line.update(region="attic")), "records.jsonl", "line 2"),
    "NaN buffer score": (
        lambda t: _write_lines(t, [dict(x, score=float("nan")) if x["region"] == "buffer" else x for x in _lines(t)]),
        "records.jsonl",
        "line \\d+.*score",
    ),
    "string buffer score": (
        lambda t: _write_lines(t, [dict(x, score="high") if x["region"] == "buffer" else x for x in _lines(t)]),
        "records.jsonl",
        "line \\d+.*score",
    ),
    "deeply nested metadata": (
        _edit_line(2, lambda lines, line: json.dumps(line)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "records.jsonl",
        "line 2",
    ),
    "infinite metadata value": (
        _edit_line(2, lambda lines, line: line.update(metadata={"a": [float("inf")]})),
        "records.jsonl",
        "line 2.*metadata",
    ),
    "more records than embeddings": (_extra_record, "records.jsonl", "line \\d+.*embeddings.safetensors"),
    "fewer records than embeddings": (_drop_last_record, "records.jsonl", "embeddings.safetensors"),
    # config.json
    "counts not an object": (_edit_config(counts="many"), "config.json", "counts"),
    "negative record count": (_edit_config(**{"counts.records": -3}), "config.json", "counts.records"),
    "record count off": (_edit_config(**{"counts.records": 1}), "config.json", "counts"),
    "float dim": (_edit_config(dim=32.0), "config.json", "'dim'"),
    "NaN match threshold": (_edit_config(match_threshold=float("nan")), "config.json", "match_threshold"),
    "communities a list": (_edit_config(communities=[1, 2]), "config.json", "communities"),
    "communities without stale": (
        lambda t: _edit_config(communities={"user_community": {}, "sizes": [], "clustered_items": 0})(t),
        "config.json",
        "communities.stale",
    ),
    "gate users not a list": (_edit_config(gate_users="u0"), "config.json", "gate_users"),
    "mediator setting out of range": (_edit_config(**{"mediator.kappa": -1.0}), "config.json", "mediator"),
    "saved setting refused": (_edit_config(scorer="telepathy"), "config.json", "scorer"),
    # embeddings.safetensors
    "wrong dtype": (
        _edit_tensors(lambda x: x.update(embeddings=x["embeddings"].astype(np.int32))),
        "embeddings.safetensors",
        "'embeddings'.*I32",
    ),
    "wrong shape": (
        _edit_tensors(lambda x: x.update(embeddings=x["embeddings"][:, :-1].copy())),
        "embeddings.safetensors",
        "'embeddings'.*shape",
    ),
    "NaN row": (_edit_tensors(_set_row("embeddings", 2, np.nan)), "embeddings.safetensors", "'embeddings'.*row 2"),
    "extra tensor": (
        _edit_tensors(lambda x: x.update(payload=np.zeros(3, dtype=np.float32))),
        "embeddings.safetensors",
        "'payload'",
    ),
    "truncated file": (_truncate, "embeddings.safetensors", ""),
    "huge header length": (_huge_header, "embeddings.safetensors", "header"),
    "header claiming 2**40 rows": (_hostile_header, "embeddings.safetensors", "'embeddings'"),
    "gate history of the wrong length": (
        _edit_tensors(lambda x: x.update(gate_owner=x["gate_owner"][:-1].copy())),
        "embeddings.safetensors",
        "'gate_owner'",
    ),
    "float gate owners": (
        _edit_tensors(lambda x: x.update(gate_owner=x["gate_owner"].astype(np.float32))),
        "embeddings.safetensors",
        "'gate_owner'",
    ),
    "labels of the wrong length": (
        _edit_tensors(lambda x: x.update(labels=x["labels"][:-1].copy())),
        "embeddings.safetensors",
        "'labels'",
    ),
    "centroids of another dim": (
        _edit_tensors(lambda x: x.update(community_centroids=np.zeros((2, 5), dtype=np.float32))),
        "embeddings.safetensors",
        "'community_centroids'",
    ),
    "records and embeddings both short": (
        lambda t: (
            _drop_last_record(t),
            _edit_tensors(lambda x: x.update(embeddings=x["embeddings"][:-1].copy(), labels=x["labels"][:-1].copy()))(
                t
            ),
        ),
        "config.json",
        "counts",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_folders_are_refused_naming_file_and_field(saved, name):
    corrupt, file, field = HOSTILE[name]
    corrupt(saved)
    with pytest.raises(ValueError, match=f"(?s){file}.*{field}") as caught:
        LoGoMemory.from_pretrained(saved)
    assert type(caught.value) is ValueError, f"{type(caught.value).__name__}: {caught.value}"


def test_the_saved_folder_itself_loads(saved):
    memory = LoGoMemory.from_pretrained(saved)
    assert len(memory) == 16 and len(memory.buffer("u1")) == 1


# ------------------------------------------------------------------------------------------------ oversized files
def _counting_json_loads(monkeypatch):
    """The `records.jsonl` lines (and anything over 1 MB) that a load hands to `json.loads`."""
    calls = []
    real = json.loads

    def loads(text, *args, **kwargs):
        if '"region"' in text or len(text) > 2**20:
            calls.append(len(text))
        return real(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    return calls


def test_far_more_lines_than_the_counts_stop_at_the_first_excess(saved, monkeypatch):
    """A million valid-looking lines where the config and the embeddings say 17: parsing stops at line 18."""
    lines = _lines(saved)
    with open(saved / "records.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(lines[0], id=f"x{i}")) + "\n" for i in range(200_000))
    calls = _counting_json_loads(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"records.jsonl.*line {len(lines) + 1}"):
        LoGoMemory.from_pretrained(saved)
    assert time.perf_counter() - start < 5
    assert len(calls) == len(lines)


def test_a_1_gib_records_file_is_refused_before_it_is_read(saved, monkeypatch):
    """1 GiB of records for 17 expected lines (a sparse file: nothing is written): refused from its size, before one
    line is parsed."""
    with open(saved / "records.jsonl", "ab") as f:
        f.truncate(2**30)
    calls = _counting_json_loads(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="records.jsonl.*1073741824 bytes"):
        LoGoMemory.from_pretrained(saved)
    assert time.perf_counter() - start < 5
    assert not calls


def test_one_huge_line_is_refused_at_the_cap(saved, monkeypatch):
    """A single 5 MB line (within the size bound of 17 lines): refused at the line cap, never parsed."""
    (saved / "records.jsonl").write_text("[" + "1," * 2_500_000 + "1]\n", encoding="utf-8")
    calls = _counting_json_loads(monkeypatch)
    with pytest.raises(ValueError, match="records.jsonl line 1.*chars"):
        LoGoMemory.from_pretrained(saved)
    assert not calls


def test_a_flood_of_blank_lines_is_refused(saved):
    with open(saved / "records.jsonl", "a", encoding="utf-8") as f:
        f.write("\n" * 100_000)
    with pytest.raises(ValueError, match="records.jsonl.*blank"):
        LoGoMemory.from_pretrained(saved)


# ------------------------------------------------------------------------------------------------ writes
def test_add_many_names_its_argument(make_memory):
    memory = make_memory()
    with pytest.raises(TypeError, match="`interactions`.*int"):
        memory.add_many(42)


@pytest.mark.parametrize("metadata", [{1: "x"}, {"outer": {2.5: "y"}}, {"list": [{None: 1}]}])
def test_non_str_metadata_keys_are_refused(metadata):
    """JSON turns every key into a string: `{1: "x"}` would come back as `{"1": "x"}` after a save and a load."""
    with pytest.raises(TypeError, match="`metadata`.*key"):
        Interaction("u", "p", "r", metadata=metadata)


def test_str_metadata_keys_survive_a_round_trip(make_memory, tmp_path):
    memory = make_memory()
    memory.add(Interaction("u", "p q", "r", metadata={"1": "x", "nested": {"k": [1, 2]}}, id="a"))
    memory.save_pretrained(tmp_path / "m")
    loaded = LoGoMemory.from_pretrained(tmp_path / "m")
    assert loaded.get("u", "a").metadata == {"1": "x", "nested": {"k": [1, 2]}}
