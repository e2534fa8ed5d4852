"""Loading a memory saved on Milvus from a folder you did not write (issue 26): the folder names data, never where to
connect, and a damaged, crashed or foreign store is refused (or, for a crash's duplicate key, repaired) on load."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from testing_utils import populated, topical

from transformers_spring.memory import LoGoMemory, MilvusBackend
from transformers_spring.memory import milvus as milvus_module

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")


def release(store: MilvusBackend) -> None:
    """Ends the writer: closes its client and stops Milvus Lite's in-process server for the file, so that the next
    client reads the file again (as another process would)."""
    from milvus_lite.server_manager import server_manager_instance

    store.close()
    server_manager_instance.release_server(store.uri)


def reopen(store: MilvusBackend, **kwargs) -> MilvusBackend:
    """What the caller passes as `backend=`: a backend on the same store and collections."""
    return MilvusBackend(kwargs.pop("uri", store.uri), collection=store.collection, num_buckets=4, **kwargs)


@pytest.fixture
def saved(make_memory, tmp_path, monkeypatch):
    """A memory on its own Milvus Lite file, saved to `tmp_path / "m"`; returns (memory, store, folder)."""
    monkeypatch.delenv("SPRING_MILVUS_URI", raising=False)
    store = MilvusBackend(str(tmp_path / "store.db"), collection="tenant_a", num_buckets=4)
    memory = populated(make_memory, backend=store, exact_below=0)
    memory.save_pretrained(tmp_path / "m")
    yield memory, store, tmp_path / "m"
    release(store)


def edit_manifest(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["backend"].update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_token_never_goes_to_a_uri_the_folder_names(saved, monkeypatch):
    import pymilvus

    memory, store, folder = saved
    edit_manifest(folder, uri="http://attacker.invalid:19530", uri_hint="http://attacker.invalid:19530")
    monkeypatch.setenv("SPRING_MILVUS_TOKEN", "root:secret")
    clients = []
    real = pymilvus.MilvusClient

    class Recorder(real):
        def __init__(self, *args, **kwargs):
            clients.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pymilvus, "MilvusClient", Recorder)
    with pytest.raises(ValueError, match=r"pass `backend=MilvusBackend\(uri, collection='tenant_a'\)`"):
        LoGoMemory.from_pretrained(folder)
    assert clients == []  # no connection was even tried
    monkeypatch.setenv("SPRING_MILVUS_URI", store.uri)  # the caller's own configuration
    assert len(LoGoMemory.from_pretrained(folder)) == len(memory)
    assert [c["uri"] for c in clients] == [store.uri]  # the token went only where the caller said


def test_another_tenant_is_refused(saved, make_memory, tmp_path):
    memory, store, folder = saved
    other = MilvusBackend(store.uri, collection="tenant_b", num_buckets=4)
    populated(make_memory, backend=other, exact_below=0).add(topical("x", "cats", 1))
    # The folder asks for tenant B's collections: B's rows are not the ones the save fingerprinted.
    edit_manifest(folder, collection="tenant_b", collections={"local": "tenant_b_local", "global": "tenant_b_global"})
    with pytest.raises(ValueError, match=r"'tenant_b_local' .* holds 49 rows that are not the 48 the save recorded"):
        LoGoMemory.from_pretrained(folder, backend=reopen(other))
    # The caller's backend names another collection than the folder's.
    edit_manifest(folder, collection="tenant_a", collections={"local": "tenant_a_local", "global": "tenant_a_global"})
    with pytest.raises(ValueError, match="stored in the Milvus collections 'tenant_a'_local and _global, not in"):
        LoGoMemory.from_pretrained(folder, backend=reopen(other))
    # Another file holding other rows in a collection of the same name.
    elsewhere = MilvusBackend(str(tmp_path / "other.db"), collection="tenant_a", num_buckets=4)
    foreign = make_memory(backend=elsewhere, exact_below=0, dedup_threshold=None)
    for i in range(48):
        foreign.add(topical(f"v{i % 4}", "rockets", i))
    with pytest.raises(ValueError, match=r"'tenant_a_local' at .*other\.db.* not the 48 the save recorded"):
        LoGoMemory.from_pretrained(folder, backend=reopen(elsewhere))
    release(elsewhere)


def test_a_deleted_store_is_named_and_not_recreated(saved):
    memory, store, folder = saved
    release(store)
    shutil.rmtree(store.uri)
    with pytest.raises(FileNotFoundError, match=r"Milvus Lite store '.*store\.db' .* does not exist"):
        LoGoMemory.from_pretrained(folder, backend=reopen(store))
    assert not os.path.exists(store.uri)


def test_a_deleted_collection_is_named_and_not_recreated(saved):
    memory, store, folder = saved
    store.client.drop_collection("tenant_a_global")
    with pytest.raises(ValueError, match="has no collection 'tenant_a_global'"):
        LoGoMemory.from_pretrained(folder, backend=reopen(store))
    assert not store.client.has_collection("tenant_a_global")


def test_missing_rows_are_named_with_expected_and_found(saved):
    memory, store, folder = saved
    store.client.delete("tenant_a_local", filter='user_id == "u1"')  # what a lost segment looks like to a reader
    store.client.flush("tenant_a_local")
    with pytest.raises(
        ValueError, match=r"'tenant_a_local' .* holds 40 rows where the save recorded 48: rows are miss"
    ):
        LoGoMemory.from_pretrained(folder, backend=reopen(store))


def test_a_deleted_segment_or_truncated_store_manifest_is_refused(saved):
    memory, store, folder = saved
    local = Path(store.uri) / "collections" / "tenant_a_local"
    release(store)
    backup = local.with_name("backup")
    shutil.copytree(local, backup)
    sorted((local / "partitions").glob("*/data/*.parquet"))[0].unlink()  # one user bucket's rows
    with pytest.raises(ValueError, match=r"'tenant_a_local' .* holds \d+ rows where the save recorded 48"):
        LoGoMemory.from_pretrained(folder, backend=reopen(store))
    release(store)
    shutil.rmtree(local)
    shutil.copytree(backup, local)
    manifest = local / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])  # a crash mid-write: Milvus Lite falls back to the previous one
    with pytest.raises(ValueError, match=r"'tenant_a_local' .* holds \d+ rows where the save recorded 48"):
        LoGoMemory.from_pretrained(folder, backend=reopen(store))


def test_a_crash_duplicate_key_is_repaired_keeping_the_newest(saved, monkeypatch, caplog):
    import pymilvus

    memory, store, folder = saved
    victim = memory.history("u1")[0]
    real = pymilvus.MilvusClient.query_iterator

    def with_duplicates(self, name, *args, **kwargs):  # the store returns one key twice, as after a killed writer
        iterator = real(self, name, *args, **kwargs)
        first = iterator.next

        def next_batch():
            batch = first()
            rows = [r for r in batch if r.get("record_id") == victim.id] if name.endswith("_local") else []
            for row in rows:
                newer = dict(row, seq=row["seq"] + 1000, record=dict(row["record"], response="the newest answer"))
                older = dict(row, seq=row["seq"] - 1, record=dict(row["record"], response="a stale answer"))
                batch = [*batch, newer, older]
            return batch

        iterator.next = next_batch
        return iterator

    monkeypatch.setattr(pymilvus.MilvusClient, "query_iterator", with_duplicates)
    monkeypatch.setattr(milvus_module.logger, "propagate", True)  # transformers' loggers stop at the library root
    with caplog.at_level(logging.WARNING, logger=milvus_module.__name__):
        loaded = LoGoMemory.from_pretrained(folder, backend=reopen(store))
    assert len(loaded) == len(memory)
    assert [r.response for r in loaded.history("u1") if r.id == victim.id] == ["the newest answer"]
    assert "held 1 primary key(s) twice" in caplog.text
    monkeypatch.setattr(pymilvus.MilvusClient, "query_iterator", real)
    rows = [r for r in store.rows("local") if r["record_id"] == victim.id]  # written back once: the store is repaired
    assert [r["record"]["response"] for r in rows] == ["the newest answer"]


def test_a_load_never_creates_a_store_from_a_relative_uri(saved, tmp_path, monkeypatch):
    memory, store, folder = saved
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoGoMemory.from_pretrained(folder, backend=MilvusBackend("store.db", collection="tenant_a", num_buckets=4))
    monkeypatch.setenv("SPRING_MILVUS_URI", "store.db")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoGoMemory.from_pretrained(folder)
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing created in the working directory
    monkeypatch.chdir(Path(store.uri).parent)  # a relative path to the real store is the caller's choice: it loads
    monkeypatch.setenv("SPRING_MILVUS_URI", Path(store.uri).name)
    assert len(LoGoMemory.from_pretrained(folder)) == len(memory)


def test_a_load_never_creates_a_missing_collection(saved, monkeypatch):
    memory, store, folder = saved
    edit_manifest(folder, collection="nobody", collections={"local": "nobody_local", "global": "nobody_global"})
    monkeypatch.setenv("SPRING_MILVUS_URI", store.uri)
    with pytest.raises(ValueError, match="has no collection 'nobody_local'"):
        LoGoMemory.from_pretrained(folder)
    assert not store.client.has_collection("nobody_local") and not store.client.has_collection("nobody_global")
    fresh = MilvusBackend(store.uri, collection="nobody", num_buckets=4)  # a backend for writing still creates
    fresh.connect(memory.dim)
    assert store.client.has_collection("nobody_local")
