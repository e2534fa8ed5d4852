"""The Milvus backend on Milvus Lite: isolation under hostile ids, retries, and the checks of a reconnect."""

import contextlib
import json
import logging
import os
import warnings

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


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def third_party_output():
    """The warning-or-above records of pymilvus, grpc and milvus_lite (pymilvus does not propagate to the root
    logger: a handler on its own logger sees them) and the Python warnings raised from those packages."""
    handler, names = _Records(), ("pymilvus", "grpc", "milvus_lite")
    for name in names:
        logging.getLogger(name).addHandler(handler)
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.records, caught
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
        third_party = [w for w in caught if any(f"{os.sep}{p}{os.sep}" in w.filename for p in names)]
        caught[:] = third_party


def _create_save_load_retrieve(encoder, uri, path):
    store = MilvusBackend(uri, collection="quiet", num_buckets=4)
    memory = LoGoMemory(encoder, gate=None, num_threads=1, exact_below=0, backend=store)
    memory.add_many(topical(f"u{u}", "cats", i) for u in range(3) for i in range(3))
    memory.save_pretrained(path)
    loaded = LoGoMemory.from_pretrained(path, backend=MilvusBackend(uri, collection="quiet", num_buckets=4))
    assert loaded.retrieve("u0", "kitten purr report", k=2)
    store.drop()
    store.close()


def test_milvus_lite_is_quiet_unless_asked(encoder, milvus_lite_uri, tmp_path, monkeypatch):
    # Milvus Lite answers pymilvus's AllocTimestamp with NotImplementedError (grpc logs it with a traceback) and its
    # queries carry no MVCC timestamp (pymilvus warns at every query iterator): neither asks anything of the user.
    monkeypatch.delenv("SPRING_SHOW_THIRD_PARTY_LOGS", raising=False)
    with third_party_output() as (records, caught):
        _create_save_load_retrieve(encoder, str(tmp_path / "quiet.db"), tmp_path / "m")
    assert [f"{r.name}: {r.getMessage()}" for r in records] == [] and [str(w.message) for w in caught] == []
    # SPRING_SHOW_THIRD_PARTY_LOGS=1 shows them again: the filters, not a quieter version, hid them.
    monkeypatch.setenv("SPRING_SHOW_THIRD_PARTY_LOGS", "1")
    with third_party_output() as (records, _):
        _create_save_load_retrieve(encoder, str(tmp_path / "loud.db"), tmp_path / "m2")
    messages = {(r.name, r.getMessage()) for r in records}
    assert ("pymilvus.client.iterator.query_iterator", "failed to get mvccTs from milvus server, use client-side ts "
            "instead") in messages  # fmt: skip
    assert ("grpc._server", "Exception calling application: Method not implemented!") in messages


def test_quiet_filters_are_installed_once_and_narrowly(milvus_lite_uri):
    from transformers_spring.utils.quiet import MILVUS_LITE_FILTERS, DropMessage

    MilvusBackend(milvus_lite_uri)
    MilvusBackend(milvus_lite_uri)
    for name, _ in MILVUS_LITE_FILTERS:
        assert sum(isinstance(f, DropMessage) for f in logging.getLogger(name).filters) == 1
    # Only the silenced message: another warning of the same logger, or another grpc error, still shows.
    other = logging.LogRecord("pymilvus.client.iterator.query_iterator", logging.WARNING, "", 0, "other", None, None)
    assert logging.getLogger("pymilvus.client.iterator.query_iterator").filter(other)
    error = logging.LogRecord("grpc._server", logging.ERROR, "", 0, "Exception calling application: boom", None, None)
    assert logging.getLogger("grpc._server").filter(error)


def test_milvus_lite_client_never_pings_its_in_process_server(milvus_lite_uri, tmp_path, monkeypatch):
    # pymilvus pings every 10 s; Lite's gRPC server allows one ping per 2 h on an idle connection (grpc's default)
    # and answers the third early ping with GOAWAY "too_many_pings", which grpc's C core prints as an error after
    # ~2 idle minutes. A loopback connection needs no keepalive.
    import grpc

    channels, real = [], grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", lambda target, options=None, **kw: channels.append(
        dict(options or ())) or real(target, options=options, **kw))  # fmt: skip
    store = MilvusBackend(str(tmp_path / "fresh.db"))  # a new file: a new server, so a new channel
    assert store.client.list_collections() == []
    store.close()
    assert channels and all(o.get("grpc.keepalive_time_ms", 2**31 - 1) >= 2 * 3600 * 1000 for o in channels)
