"""LoGoMemory's files (`persistence/memory_files.py`): every load checks types, ranges, consistency and size limits
before restoring anything, and names the file and field of what it refuses."""

import json
from pathlib import Path

import numpy as np
import pytest
from testing_utils import edit_memory_config, populated, topical

from transformers_spring.memory import LoGoMemory


def _saved_shared(make_memory, tmp_path):
    memory = populated(make_memory, use_global=True)
    memory.set_sharing("u3", False)
    memory.set_buffer("u1", [topical("u1", "cats", 77)], scores=[1.0])
    target = tmp_path / "mem"
    memory.save_pretrained(target)
    return target


def _edit_tensors(target, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(target / "embeddings.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "embeddings.safetensors"))


def _labels(fn):
    def edit(tensors):
        tensors["labels"] = fn(tensors["labels"].copy())

    return edit


def _shared_rows(target):
    lines = [json.loads(line) for line in (target / "records.jsonl").read_text().splitlines()]
    return lines


def _dup(labels):
    shared = np.flatnonzero(labels >= 0)
    labels[shared[1]] = labels[shared[0]]
    return labels


def _opted_out_label(target):
    lines = _shared_rows(target)
    row = next(i for i, line in enumerate(lines) if line["user_id"] == "u3" and line["region"] == "history")

    def edit(labels):
        labels[row] = labels.max() + 1
        return labels

    return row, edit


CORRUPTIONS = {
    "duplicate label": (lambda t: _edit_tensors(t, _labels(_dup)), "labels.*repeat"),
    "float labels": (lambda t: _edit_tensors(t, _labels(lambda x: x.astype(np.float32))), "labels.*integer"),
    "negative next_label": (lambda t: edit_memory_config(t, next_label=-5), "next_label"),
    "string boolean": (lambda t: edit_memory_config(t, **{"sharing.u3": "false"}), "sharing.u3"),
    "label beyond next_label": (lambda t: edit_memory_config(t, next_label=1), "next_label"),
    "unnormalised embeddings": (
        lambda t: _edit_tensors(t, lambda x: x.update(embeddings=x["embeddings"] * 3)),
        "norm",
    ),
    "zero embedding": (lambda t: _edit_tensors(t, lambda x: x["embeddings"].__setitem__(0, 0.0)), "norm"),
    "capacity ignored": (lambda t: edit_memory_config(t, capacity=2), "capacity"),
    "huge dim": (lambda t: edit_memory_config(t, dim=10**9), "'dim'"),
    "huge n_communities": (lambda t: edit_memory_config(t, n_communities=10**8), "n_communities"),
    "buffer record labelled": (None, "buffer records must be -1"),
    "opted-out user labelled": (None, "does not share"),
    "long line": (lambda t: (t / "records.jsonl").write_text("x" * (2**20 + 10) + "\n"), "line 1"),
    "community out of range": (
        lambda t: edit_memory_config(t, **{"communities.user_community.u0": 10**6}),
        "user_community",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_folders_are_refused_naming_file_and_field(make_memory, tmp_path, name):
    target = _saved_shared(make_memory, tmp_path)
    corrupt, match = CORRUPTIONS[name]
    if name == "buffer record labelled":
        lines = _shared_rows(target)
        row = next(i for i, line in enumerate(lines) if line["region"] == "buffer")
        _edit_tensors(target, _labels(lambda x: (x.__setitem__(row, x.max() + 1), x)[1]))
    elif name == "opted-out user labelled":
        _, edit = _opted_out_label(target)
        _edit_tensors(target, _labels(edit))
        edit_memory_config(target, next_label=10**4)
    else:
        corrupt(target)
    with pytest.raises(ValueError, match=match):
        LoGoMemory.from_pretrained(target)


def test_symlinked_records_from_another_memory_are_refused(make_memory, tmp_path):
    target = _saved_shared(make_memory, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "records.jsonl").write_text((target / "records.jsonl").read_text())
    (target / "records.jsonl").unlink()
    (target / "records.jsonl").symlink_to(other / "records.jsonl")
    with pytest.raises(ValueError, match="records.jsonl.*symlink"):
        LoGoMemory.from_pretrained(target)


def test_huge_labels_load_renumbered_instead_of_allocating(make_memory, tmp_path):
    """Labels are internal: a load renumbers them densely, so an edited (or long-churned) label of 2**39 costs
    nothing and later adds still work."""
    target = _saved_shared(make_memory, tmp_path)
    edit_memory_config(target, next_label=2**40)
    _edit_tensors(target, _labels(lambda x: np.where(x >= 0, x + 2**39, x)))
    memory = LoGoMemory.from_pretrained(target)
    assert memory._next_label == len(memory.global_memory)
    memory.add(topical("u0", "cats", 500))
    assert memory.retrieve("u2", "kitten purr", k=2)


def test_hub_cache_snapshots_are_read_through_their_blob_symlinks(make_memory, tmp_path, monkeypatch):
    memory = populated(make_memory)
    saved = tmp_path / "saved"
    memory.save_pretrained(saved)
    repo = tmp_path / "hub" / "models--me--mem"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in saved.iterdir():  # the Hub cache's layout: snapshot files are symlinks into blobs/
        if path.is_file():
            blob = blobs / f"blob-{path.name}"
            blob.write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert len(LoGoMemory.from_pretrained("me/mem", cache_dir=tmp_path / "hub")) == len(memory)


def test_what_a_save_writes_always_loads(tmp_path):
    """A custom encoder that does not normalise, and settings overridden at load: both loaded before, both still do."""
    from transformers_spring.memory import CallableEncoder

    def unnormalised(texts):
        return np.stack([np.array([len(t), 1.0 + 5 * t.count("a"), 3.0 * (i + 1)]) for i, t in enumerate(texts)])

    encoder = CallableEncoder(unnormalised, name="toy", dim=3)
    memory = LoGoMemory(encoder, gate=None, num_threads=1, use_global=False, dedup_threshold=None)
    memory.add_many([topical("u0", "cats", i) for i in range(6)])
    memory.save_pretrained(tmp_path / "mem")
    assert len(LoGoMemory.from_pretrained(tmp_path / "mem", encoder=encoder)) == 6
    assert len(LoGoMemory.from_pretrained(tmp_path / "mem", encoder=encoder, capacity=2, share_by_default=False)) == 6


# ------------------------------------------------------------------------------------------------ the ANN cache
@pytest.fixture
def cached(monkeypatch, tmp_path):
    """Caches the ANN index of any memory size (the default threshold is 10,000 shared items), with this test's own
    machine key."""
    import transformers_spring.memory.global_memory as gm

    monkeypatch.setattr(gm, "ANN_CACHE_MIN_ITEMS", 1)
    monkeypatch.setenv("SPRING_CACHE_HOME", str(tmp_path / "machine"))


def _global_results(memory, queries):
    """Each query's ANN hits as (user, record id, score), independent of internal labels."""
    gm = memory.global_memory
    out = []
    for query in queries:
        vector = memory.encoder.encode([query])[0]
        hits = gm.search(vector, 5, scope="all")
        out.append([(*memory._label_keys[label], round(score, 6)) for label, score, *_ in hits])
    return out


QUERIES = ["cat kitten purr report", "rocket launch orbit booster", "bread oven"]


def _builds(monkeypatch):
    from transformers_spring.memory.global_memory import GlobalMemory

    calls = []
    original = GlobalMemory._build_index
    monkeypatch.setattr(GlobalMemory, "_build_index", lambda self: (calls.append(1), original(self))[1])
    return calls


def test_a_save_caches_the_index_and_a_load_reuses_it(make_memory, tmp_path, cached, monkeypatch):
    memory = populated(make_memory, use_global=True, exact_below=0)
    # Interleaved writes: the records file groups them by user, so labels are out of file order.
    memory.add_many([topical("u0", "bread", 50), topical("u1", "bread", 51), topical("u0", "bread", 52)])
    before = _global_results(memory, QUERIES)
    assert all(before)
    memory.save_pretrained(tmp_path / "mem")
    config = json.loads((tmp_path / "mem" / "config.json").read_text())
    assert (tmp_path / "mem" / "ann_index.hnsw").is_file() and config["ann_index"]["count"] == len(memory)
    builds = _builds(monkeypatch)
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem", encoder=memory.encoder, num_threads=1)
    assert builds == []  # the cached graph, not a rebuild
    assert _global_results(loaded, QUERIES) == before  # the very same graph: the same approximate hits
    loaded.add(topical("u9", "bread", 1))  # labels continue after the saved ones
    assert len(loaded.global_memory) == len(memory) + 1


@pytest.mark.parametrize("spoil", ["file", "data", "params", "hub", "machine", "labels"])
def test_a_stale_or_foreign_cache_is_rebuilt(make_memory, tmp_path, cached, monkeypatch, spoil):
    memory = populated(make_memory, use_global=True, exact_below=0)
    exact = [[hit.interaction.id for hit in memory.retrieve("u0", q, k=3)] for q in QUERIES]
    target = tmp_path / "mem"
    overrides = {}
    if spoil == "hub":  # a Hub cache snapshot: its index is never loaded
        target = tmp_path / "models--org--mem" / "snapshots" / "abc123"
    memory.save_pretrained(target)
    if spoil == "file":
        data = bytearray((target / "ann_index.hnsw").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (target / "ann_index.hnsw").write_bytes(bytes(data))
    elif spoil == "data":
        edit_memory_config(target, **{"ann_index.data_sha256": "0" * 64})
    elif spoil == "params":
        overrides = {"hnsw_M": 8}
    elif spoil == "machine":  # a folder written elsewhere (a clone of someone's repo): its index is never loaded
        monkeypatch.setenv("SPRING_CACHE_HOME", str(tmp_path / "another-machine"))
    elif spoil == "labels":  # sparse labels: reusing them would let label-indexed arrays grow with every write
        edit_memory_config(target, next_label=10**6)
    builds = _builds(monkeypatch)
    loaded = LoGoMemory.from_pretrained(target, encoder=memory.encoder, num_threads=1, **overrides)
    assert builds == [1]
    if spoil != "params":  # another graph (M=8) may give other approximate hits
        assert [[hit.interaction.id for hit in loaded.retrieve("u0", q, k=3)] for q in QUERIES] == exact


def test_no_cache_outlives_a_deleted_or_forgotten_item(make_memory, tmp_path, cached):
    from testing_utils import find_traces

    memory = populated(make_memory, use_global=True)
    memory.save_pretrained(tmp_path / "mem")
    assert (tmp_path / "mem" / "ann_index.hnsw").is_file()
    memory.forget_user("u2")  # a tombstone in hnswlib still holds the vector: no cache from this index
    memory.save_pretrained(tmp_path / "mem")
    assert not (tmp_path / "mem" / "ann_index.hnsw").exists()
    assert "ann_index" not in json.loads((tmp_path / "mem" / "config.json").read_text())
    assert find_traces(tmp_path / "mem", "u2") == []
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem", encoder=memory.encoder, num_threads=1)
    loaded.save_pretrained(tmp_path / "mem")  # a rebuilt index has no tombstones: cached again
    assert (tmp_path / "mem" / "ann_index.hnsw").is_file()


def test_push_to_hub_never_uploads_the_cache(make_memory, cached, tmp_path):
    from unittest import mock

    memory = populated(make_memory, use_global=True)
    memory.save_pretrained(tmp_path / "local")
    assert (tmp_path / "local" / "ann_index.hnsw").is_file()  # a local save caches it
    uploaded = {}

    def upload(self, *, folder_path, **kwargs):
        uploaded["files"] = sorted(p.name for p in Path(folder_path).rglob("*"))
        uploaded["ignore"] = kwargs["ignore_patterns"]

    with (
        mock.patch("huggingface_hub.HfApi.create_repo") as create,
        mock.patch("huggingface_hub.HfApi.upload_folder", upload),
    ):
        create.return_value.repo_id = "me/mem"
        memory.push_to_hub("me/mem", ignore_patterns="*.log")
    assert "ann_index.hnsw" not in uploaded["files"] and "embeddings.safetensors" in uploaded["files"]
    assert uploaded["ignore"] == ["*.log", "*ann_index.hnsw"]


def test_saved_matches_are_restored_and_checked(make_memory, tmp_path):
    from transformers_spring.memory import Interaction

    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None)
    for user in ("a", "b", "c", "d"):  # the same story by four users: shared content, servable
        memory.add(Interaction(user, "fed raises interest rates again", "rates rise", timestamp=1e9, id=f"{user}-s"))
        words = " ".join(f"{user}secret{j}" for j in range(6))  # and one story of their own each
        memory.add(Interaction(user, f"cat {words}", f"my cat {user}", timestamp=1e9 + 1, id=f"{user}-unique-0"))
    servable = {key for label, key in memory._label_keys.items() if memory.global_memory.is_servable(label)}
    assert servable  # the rule serves something here
    memory.save_pretrained(tmp_path / "mem")
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem", encoder=memory.encoder, num_threads=1)
    gm = loaded.global_memory
    assert {key for label, key in loaded._label_keys.items() if gm.is_servable(label)} == servable

    # Forged matches between items that do not match are dropped: they would give a-unique-0 two backers (b and c),
    # enough for min_contributors=3.
    lines = [json.loads(line) for line in (tmp_path / "mem" / "records.jsonl").read_text().splitlines()]
    at = {line["id"]: i for i, line in enumerate(lines)}

    def forge(tensors):
        forged = [[at["a-unique-0"], at["b-unique-0"]], [at["a-unique-0"], at["c-unique-0"]]]
        tensors["match_pairs"] = np.concatenate([tensors["match_pairs"], forged]).astype(np.int64)

    _edit_tensors(tmp_path / "mem", forge)
    forged = LoGoMemory.from_pretrained(tmp_path / "mem", encoder=memory.encoder, num_threads=1)
    gm = forged.global_memory
    label = next(label for label, key in forged._label_keys.items() if key == ("a", "a-unique-0"))
    assert gm.support.backers(label) == 0 and not gm.is_servable(label)
    assert {key for label, key in forged._label_keys.items() if gm.is_servable(label)} == servable

    _edit_tensors(tmp_path / "mem", lambda t: t.update(match_pairs=np.asarray([[0, 10**6]], dtype=np.int64)))
    with pytest.raises(ValueError, match="'match_pairs' indexes outside records.jsonl"):
        LoGoMemory.from_pretrained(tmp_path / "mem", encoder=memory.encoder)


def test_paused_gc_restores_the_collector_even_when_the_load_fails():
    import gc

    from transformers_spring.persistence.memory_files import paused_gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        assert not gc.isenabled()
        raise RuntimeError("a load that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # (left as the caller had it)
    finally:
        gc.enable()
