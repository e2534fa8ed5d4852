"""The served state: restart replay, period updates that fail, erasure that a crash interrupted."""

import pytest
import torch

from transformers_spring.memory import Interaction
from transformers_spring.persistence.journal import read_serve_state, write_serve_state
from transformers_spring.server import ServerState


def new_items(user, n, start=0):
    return [Interaction(user, f"write a headline for cats {i}", f"w{i} w{i + 1}", timestamp=5000 + i, id=f"{user}-n{i}")
            for i in range(start, start + n)]  # fmt: skip


def record(state, items):
    state.journal.append(items)
    return state.record(items)


def adapter_weights(state, user):
    return {k: v.detach().clone() for k, v in state.personalizer.state_dict(user).items()}


def test_a_restart_replays_the_journal_into_memory_and_pending(tmp_path, served_state):
    state = ServerState(served_state, tmp_path / "w", period_size=3)
    assert record(state, new_items("alice", 2)) == []
    assert record(state, new_items("alice", 1, 2)) == ["alice"]
    assert state.update("alice")["items"] == 3
    record(state, new_items("alice", 2, 3))
    record(state, new_items("carol", 1))  # a new user, never trained
    del state
    again = ServerState(served_state, tmp_path / "w", period_size=3)
    assert [it.id for it in again.pending["alice"]] == ["alice-n3", "alice-n4"]
    assert [it.id for it in again.pending["carol"]] == ["carol-n0"]
    assert again.memory.get("alice", "alice-n4") is not None and again.is_known("carol")
    assert again.personalizer.period("alice") == 2  # the saved update, loaded from <workdir>/state


def test_a_failed_update_keeps_the_previous_adapter_and_the_pending_items(tmp_path, served_state, monkeypatch):
    state = ServerState(served_state, tmp_path / "w", period_size=0)
    record(state, new_items("bob", 2))
    before = adapter_weights(state, "bob")

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(state.personalizer, "observe", broken)
    assert state.update("bob") is None and state.update_failures == 1
    assert len(state.pending["bob"]) == 2
    after = adapter_weights(state, "bob")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_erasure_interrupted_by_a_crash_is_finished_at_the_next_start(tmp_path, served_state):
    state = ServerState(served_state, tmp_path / "w")
    record(state, new_items("bob", 2))
    serve = read_serve_state(tmp_path / "w")
    serve["erasing"] = ["bob"]  # the marker is written first; then the crash
    write_serve_state(tmp_path / "w", serve)
    del state
    again = ServerState(served_state, tmp_path / "w")
    assert not again.is_known("bob") and again.journal.entries("bob") == []
    assert "bob" not in again.personalizer.users
    assert read_serve_state(tmp_path / "w")["erasing"] == []


def test_a_folder_that_is_no_state_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="neither a ContinualPersonalizer folder"):
        ServerState(tmp_path / "x", tmp_path / "w")


def test_a_bad_user_id_is_refused_before_anything_is_marked(tmp_path, served_state):
    state = ServerState(served_state, tmp_path / "w")
    with pytest.raises(ValueError):
        state.forget_user(" x/y")
    assert read_serve_state(tmp_path / "w")["erasing"] == []
    ServerState(served_state, tmp_path / "w")  # still starts


def test_erasure_in_a_spring_model_folder_survives_a_restart(tmp_path, served_state):
    from transformers_spring.generation import SpringForCausalLM

    SpringForCausalLM.from_pretrained(served_state).save_pretrained(tmp_path / "model")
    state = ServerState(tmp_path / "model", tmp_path / "w")
    assert state.personalizer is None and state.is_known("bob")
    assert state.forget_user("bob")
    again = ServerState(tmp_path / "model", tmp_path / "w")
    assert not again.is_known("bob") and again.is_known("alice")
    assert SpringForCausalLM.from_pretrained(tmp_path / "model").memory.has_user("bob")  # `--state` is not touched
