"""The Milvus backend on Milvus Lite: isolation under hostile ids, retries, and the checks of a reconnect."""

import json

import numpy as np
import pytest
from testing_utils import populated, topical

from transformers_spring.memory import BackendError, Interaction, LoGoMemory, MilvusBackend
from transformers_spring.memory.milvus import local_key

on_milvus = pytest.mark.parametrize("backend", ["milvus"], indirect=True)


@on_milvus
def test_hostile_user_ids_cannot_widen_a_filter(make_memory, backend):
    memory = make_memory(use_global=False)
    evil = 'x" or user_id != "'
    memory.add(Interaction("victim", "secret cat plan", "meow", id="s"))
    memory.add(Interaction(evil, "cat plan", "purr", id="e"))
    memory.add(Interaction('a "quoted" ünï [list]', "cat plan too", "purr", id="b"))
    for user in (evil, 'a "quoted" ünï [list]'):
        assert {h.interaction.user_id for h in memory.retrieve(user, "secret cat plan", k=10)} == {user}
    assert memory.forget_user(evil) and memory.backend.count("local") == 2


def test_local_keys_never_collide():
    assert local_key("a/b", "history", "c") != local_key("a", "history", "b/c")
    assert len(local_key("u" * 256, "buffer", "r" * 256)) == 64


@on_milvus
def test_transient_failures_are_retried_then_named(make_memory, backend, monkeypatch):
    memory = make_memory()
    store = memory.backend
    client, calls = store.client, {"n": 0}
    real = client.upsert

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("connection reset")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "backoff", 0.0)
    monkeypatch.setattr(client, "upsert", flaky)
    memory.add(topical("u0", "cats", 0))  # two failures, then the retry lands: once, by its key
    assert store.count("local") == 1 and calls["n"] >= 3

    monkeypatch.setattr(client, "upsert", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("deadline exceeded")))
    with pytest.raises(BackendError, match=r"Milvus at .*upsert on collection '.*_local' failed after 5 attempt"):
        memory.add(topical("u0", "cats", 1))


@on_milvus
def test_a_failed_read_batch_is_not_retried(make_memory, backend, monkeypatch):
    # A retried `next` of a query iterator could return the following batch: a load would silently miss rows.
    memory = make_memory()
    memory.add(topical("u0", "cats", 0))
    store, calls = memory.backend, {"n": 0}
    real = store.client.query_iterator

    def failing_iterator(*args, **kwargs):
        iterator = real(*args, **kwargs)

        def next_batch():
            calls["n"] += 1
            raise ConnectionError("stream reset")

        iterator.next = next_batch
        return iterator

    monkeypatch.setattr(store, "backoff", 0.0)
    monkeypatch.setattr(store.client, "query_iterator", failing_iterator)
    with pytest.raises(BackendError, match="query_iterator .* failed after 1 attempt"):
        list(store.rows("local"))
    assert calls["n"] == 1


@on_milvus
def test_reconnect_checks_dim_and_buckets(make_memory, backend):
    memory = make_memory()
    memory.add(topical("u0", "cats", 0))
    other = MilvusBackend(memory.backend.uri, collection=memory.backend.collection, num_buckets=4)
    with pytest.raises(ValueError, match="32-d vectors|64-d vectors"):
        other.connect(32)
    with pytest.raises(ValueError, match="num_buckets"):
        MilvusBackend(memory.backend.uri, collection=memory.backend.collection, num_buckets=8).connect(64)
    with pytest.raises(ValueError, match="already holds 1 local"):  # a new memory never mixes into a used store
        make_memory(backend=MilvusBackend(memory.backend.uri, collection=memory.backend.collection, num_buckets=4))


@on_milvus
def test_a_save_is_a_manifest_without_token_and_reconnects(make_memory, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("SPRING_MILVUS_TOKEN", "root:Milvus")
    memory = populated(make_memory)
    memory.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["backend"]["collections"] == {
        "local": f"{memory.backend.collection}_local",
        "global": f"{memory.backend.collection}_global",
    }
    assert all(b"Milvus" not in p.read_bytes() or p.name == "README.md" for p in (tmp_path / "m").iterdir())
    assert not any(b"root:Milvus" in p.read_bytes() for p in (tmp_path / "m").iterdir())
    assert "uri" not in config["backend"] and config["backend"]["fingerprint"]["local"]["rows"] == len(memory)
    store = memory.backend
    # Rows written after the save load with it: the saved rows are all there (their sampled key hashes too).
    memory.add(topical("u9", "rockets", 1))
    loaded = LoGoMemory.from_pretrained(
        tmp_path / "m", backend=MilvusBackend(store.uri, collection=store.collection, num_buckets=4)
    )
    assert len(loaded) == len(memory) and "u9" in loaded.users()
    assert loaded._next_label >= memory._next_label  # labels other writers use are never handed out again
    # Rows of the save deleted since: not the rows the save recorded, refused unless the caller chooses otherwise.
    memory.forget_user("u0")
    with pytest.raises(ValueError, match="not the .* rows the save recorded|rows are missing"):
        LoGoMemory.from_pretrained(
            tmp_path / "m", backend=MilvusBackend(store.uri, collection=store.collection, num_buckets=4)
        )
    # The caller may load what the store holds now (a folder cannot make that choice).
    again = MilvusBackend(store.uri, collection=store.collection, num_buckets=4, check_fingerprint=False)
    loaded = LoGoMemory.from_pretrained(tmp_path / "m", backend=again)
    assert len(loaded) == len(memory) and "u0" not in loaded.users()


@on_milvus
def test_a_tampered_row_is_refused_naming_the_collection(make_memory, backend, tmp_path):
    memory = populated(make_memory)
    memory.save_pretrained(tmp_path / "m")
    store = memory.backend
    row = next(r for r in store.rows("local") if r["user_id"] == "u1")
    row["record"] = dict(row["record"], user_id="u0")  # a row claiming another user's record
    row["vector"] = np.asarray(row["vector"], dtype=np.float32)
    store.upsert("local", [row])
    store.flush()
    with pytest.raises(ValueError, match=r"_local: record .* of user 'u1': the stored record names user 'u0'"):
        LoGoMemory.from_pretrained(
            tmp_path / "m", backend=MilvusBackend(store.uri, collection=store.collection, num_buckets=4)
        )
    row["record"] = dict(row["record"], user_id="u1")
    row["vector"] = 2 * row["vector"]
    store.upsert("local", [row])
    store.flush()
    with pytest.raises(ValueError, match="norm 1"):
        LoGoMemory.from_pretrained(
            tmp_path / "m", backend=MilvusBackend(store.uri, collection=store.collection, num_buckets=4)
        )


@on_milvus
def test_forget_user_leaves_no_row(make_memory, backend):
    memory = populated(make_memory)
    memory.set_buffer("u2", [topical("u2", "bread", 50)])
    assert memory.backend.count("local", "u2") == 9 and memory.backend.count("global", "u2") == 8
    assert memory.forget_user("u2")
    assert memory.backend.count("local", "u2") == memory.backend.count("global", "u2") == 0
    assert all(row["user_id"] != "u2" for scope in ("local", "global") for row in memory.backend.rows(scope))


def test_bad_settings_are_named(monkeypatch):
    monkeypatch.delenv("SPRING_MILVUS_URI", raising=False)
    for kwargs, field in [
        (dict(uri=""), "uri"),
        (dict(uri="x.db", collection="1bad"), "collection"),
        (dict(uri="x.db", collection="a-b"), "collection"),
        (dict(uri="x.db", num_buckets=0), "num_buckets"),
        (dict(uri="x.db", retries=-1), "retries"),
        (dict(uri="x.db", search_ef=0), "search_ef"),
        (dict(uri="x.db", searches="server"), "searches"),
    ]:
        with pytest.raises(ValueError, match=field):
            MilvusBackend(**kwargs)
    with pytest.raises(
        ValueError, match=r"never chooses where to connect: pass `backend=MilvusBackend\(uri, collection='c'"
    ):
        MilvusBackend.from_manifest({"type": "milvus", "collection": "c", "uri": "http://elsewhere:19530"})


def test_who_answers_searches_defaults_by_uri():
    assert MilvusBackend("x.db").searches == "process" and not MilvusBackend("x.db").serves_searches
    assert MilvusBackend("http://milvus:19530").serves_searches
    saved = {"type": "milvus", "collection": "c", "num_buckets": 8, "searches": "milvus"}
    assert MilvusBackend.from_manifest(saved, "/tmp/x.db").searches == "milvus"
    again = MilvusBackend.from_manifest(saved, "http://milvus:19530")
    assert (again.uri, again.collection, again.num_buckets, again.searches) == (
        "http://milvus:19530",
        "c",
        8,
        "milvus",
    )
    for uri, want in [("/tmp/x.db", "process"), ("http://milvus:19530", "milvus")]:  # saved before `searches`
        old = {k: v for k, v in saved.items() if k != "searches"}
        assert MilvusBackend.from_manifest(old, uri).searches == want
    with pytest.raises(AttributeError):  # fixed at construction: a memory builds or skips its index by it
        MilvusBackend("x.db").searches = "milvus"


@on_milvus
def test_a_reopened_collection_keeps_its_index(make_memory, backend):
    memory = make_memory()  # the fixture's "milvus" kind: HNSW declared
    memory.add(topical("u0", "cats", 0))
    store = memory.backend
    flat = MilvusBackend(store.uri, collection=store.collection, num_buckets=4, searches="process")
    assert flat.global_index["index_type"] == "FLAT"
    flat._client = store.client  # Milvus Lite serves one client per file in a process
    flat.connect(memory.encoder.dim)
    assert flat.global_index["index_type"] == "HNSW"  # searches are shaped by the index the collection has


@pytest.mark.parametrize("backend", ["milvus-process"], indirect=True)
def test_process_searches_never_call_milvus_and_match_the_default(
    make_memory, backend, encoder, monkeypatch, tmp_path
):
    memory = populated(make_memory, gate=None)
    reference = populated(lambda **kw: LoGoMemory(encoder, num_threads=1, exact_below=0, **kw), gate=None)

    def seen(ctx):  # ids are random per memory: compare what was written
        return [(h.interaction.user_id, h.interaction.prompt, h.interaction.response, h.source, round(h.score, 6))
                for h in ctx.local_hits + ctx.global_hits]  # fmt: skip

    def same_answers(memory):
        shared = 0
        for user, query in [("u0", "kitten purr report"), ("u1", "rocket orbit"), ("nobody", "meow whiskers")]:
            got = memory.retrieve_context(user, query, k=4)
            assert seen(got) == seen(reference.retrieve_context(user, query, k=4))
            shared += len(got.global_hits)
        assert shared

    calls = []
    monkeypatch.setattr(MilvusBackend, "search", lambda self, *a, **k: calls.append(a))
    same_answers(memory)
    for m in (memory, reference):  # after a delete, an erasure and a new write, the mirror's index follows
        first = m.history("u2")[0]
        assert m.delete("u2", first.id) and m.forget_user("u3")
        m.add(topical("u9", "rockets", 1))
    same_answers(memory)
    assert memory.backend.count("local", "u9") == 1 and memory.backend.count("local", "u3") == 0  # Milvus has them
    memory.save_pretrained(tmp_path / "m")
    store = memory.backend
    again = MilvusBackend(store.uri, collection=store.collection, num_buckets=4)  # "process": a file's default
    same_answers(LoGoMemory.from_pretrained(tmp_path / "m", backend=again))  # the index is rebuilt from Milvus's rows
    assert calls == []
