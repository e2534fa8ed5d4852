"""The backend interface and the write journal: writes a backend did not confirm are kept and replayed, in order."""

import pytest
from testing_utils import topical

from transformers_spring.memory import BackendError, MilvusBackend, VectorBackend, WriteJournal


class FlakyBackend:
    """Records the writes it confirms; fails every call while `down`."""

    def __init__(self):
        self.down = False
        self.applied: list[tuple] = []
        self.flushes = 0

    def _check(self):
        if self.down:
            raise BackendError("store unreachable")

    def upsert(self, scope, rows):
        self._check()
        self.applied.append(("upsert", scope, [r.get("record_id", r.get("label")) for r in rows]))

    def delete(self, scope, keys):
        self._check()
        self.applied.append(("delete", scope, list(keys)))

    def delete_user(self, scope, user_id):
        self._check()
        self.applied.append(("delete_user", scope, user_id))
        return 0

    def flush(self):
        self._check()
        self.flushes += 1


def test_the_milvus_backend_implements_the_interface():
    assert isinstance(MilvusBackend("unused.db"), VectorBackend)


def test_unconfirmed_writes_stay_queued_and_replay_in_order():
    backend = FlakyBackend()
    journal = WriteJournal(backend)
    journal.upsert("local", [{"record_id": "a"}])
    journal.commit()
    assert backend.applied == [("upsert", "local", ["a"])] and len(journal) == 0 and backend.flushes == 1

    backend.down = True
    journal.delete("local", [("u", "history", "a")])
    journal.upsert("global", [{"label": 7}])
    with pytest.raises(BackendError, match="unreachable"):
        journal.commit()
    assert len(journal) == 2 and len(backend.applied) == 1  # nothing confirmed, nothing dropped

    backend.down = False
    journal.delete_user("global", "u")
    journal.commit()
    assert backend.applied[1:] == [
        ("delete", "local", [("u", "history", "a")]),
        ("upsert", "global", [7]),
        ("delete_user", "global", "u"),
    ]
    assert len(journal) == 0


def test_empty_writes_are_not_queued():
    journal = WriteJournal(FlakyBackend())
    journal.upsert("local", [])
    journal.delete("global", [])
    assert len(journal) == 0
    journal.commit()  # nothing to do: no flush either
    assert journal.backend.flushes == 0


@pytest.mark.parametrize("backend", ["milvus"], indirect=True)
def test_a_memory_keeps_writes_through_an_outage(make_memory, backend, tmp_path, monkeypatch):
    memory = make_memory()
    memory.add(topical("u0", "cats", 0))
    store = memory.backend
    real_upsert = type(store).upsert
    monkeypatch.setattr(store, "retries", 0)

    def down(*args, **kwargs):
        raise BackendError("store unreachable")

    monkeypatch.setattr(store, "upsert", down)
    with pytest.raises(BackendError):
        memory.add(topical("u0", "cats", 1))
    assert len(memory) == 2 and len(memory._journal) >= 1  # in the process, and queued for the store
    with pytest.raises(BackendError):  # a save never names a store that lacks acknowledged writes
        memory.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "config.json").exists()

    monkeypatch.setattr(store, "upsert", real_upsert.__get__(store))
    memory.flush()
    assert len(memory._journal) == 0 and store.count("local") == 2 and store.count("global") == 2
    memory.save_pretrained(tmp_path / "m")
    assert len(type(memory).from_pretrained(tmp_path / "m")) == 2
