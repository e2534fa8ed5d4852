import json
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from testing_utils import TRAINING_VOCAB, make_args, make_buffer_memory, make_interactions, make_model, make_tokenizer

from transformers_spring.memory import HashingEncoder
from transformers_spring.training import ContinualPersonalizer

USERS = ("alice", "bob", "carol")


def stream(user, period, n=6):
    return make_interactions(user, n, start=100 * period)


def personalizer(tmp_path, **kwargs):
    kwargs.setdefault("max_resident_adapters", 8)
    # The paper's top-30 % drift selection (the default preset trains on every sample): these tests check selections.
    args = kwargs.pop("args", None) or make_args(tmp_path, buffer_size=3, selection_ratio=0.3)
    return ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size),
        make_tokenizer(TRAINING_VOCAB, chat=True),
        args,
        make_buffer_memory(),
        **kwargs,
    )


def adapters_of(p):
    return {user: p.state_dict(user) for user in p.users}


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for user in a:
        assert a[user].keys() == b[user].keys()
        for key in a[user]:
            assert torch.equal(a[user][key], b[user][key]), (user, key)


def test_the_callers_model_is_modified_in_place_and_the_personalizer_says_so(tmp_path, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging

    model = make_model("llama", TRAINING_VOCAB.size)
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        before = model(ids).logits
    args = make_args(tmp_path, buffer_size=3, num_train_epochs=1)
    tokenizer = make_tokenizer(TRAINING_VOCAB, chat=True)
    logging.enable_propagation()
    try:
        p = ContinualPersonalizer(model, tokenizer, args, make_buffer_memory())
        lines = [r.getMessage() for r in caplog.records if "in place" in r.getMessage()]
        assert len(lines) == 1 and "disable_adapter()" in lines[0] and "separate copy" in lines[0]
        assert caplog.records[-1].levelname == "WARNING"
        caplog.clear()
        # A model that is a PeftModel already is what it looks like: nothing to warn about.
        peft = get_peft_model(make_model("llama", TRAINING_VOCAB.size), LoraConfig(r=2, target_modules=["q_proj"]))
        ContinualPersonalizer(peft, tokenizer, args, make_buffer_memory())
        assert not any("in place" in r.getMessage() for r in caplog.records)
    finally:
        logging.disable_propagation()
    p.observe("alice", stream("alice", 0))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)  # the caller's own object now runs alice's adapter
        with p.model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, before)
            torch.testing.assert_close(p.model(ids).logits, before)


def test_observe_counts_periods_and_keeps_buffers(tmp_path):
    p = personalizer(tmp_path)
    assert p.period("alice") == 0
    out0 = p.observe("alice", stream("alice", 0))
    assert out0.period == 0 and len(out0.selected_ids) == 6 and p.period("alice") == 1
    out1 = p.observe("alice", stream("alice", 1))
    assert out1.period == 1 and len(out1.selected_ids) == 2 and p.period("alice") == 2
    assert [i.id for i in p.memory.buffer("alice")] == out1.buffer_ids
    assert p.users == ["alice"] and p.adapter_name("alice") == "alice"


def test_bounded_residency_is_bit_exact(tmp_path):
    resident = personalizer(tmp_path / "a", max_resident_adapters=8)
    swapping = personalizer(tmp_path / "b", max_resident_adapters=1)
    for period in range(3):
        for user in USERS:
            resident.observe(user, stream(user, period))
            swapping.observe(user, stream(user, period))
            assert len(swapping.resident_users) == 1 and swapping.resident_users == [user]
            assert len(swapping.model.peft_config) == 1
    assert resident.resident_users == list(USERS)
    assert_same_adapters(adapters_of(resident), adapters_of(swapping))
    for user in USERS:
        assert [i.id for i in resident.memory.buffer(user)] == [i.id for i in swapping.memory.buffer(user)]


def test_training_one_user_leaves_the_others_bit_identical(tmp_path):
    p = personalizer(tmp_path, max_resident_adapters=2)
    for user in USERS:
        p.observe(user, stream(user, 0))
    before = adapters_of(p)
    p.observe("bob", stream("bob", 1))
    after = adapters_of(p)
    for user in ("alice", "carol"):
        assert all(torch.equal(before[user][k], after[user][k]) for k in before[user])
    assert any(not torch.equal(before["bob"][k], after["bob"][k]) for k in before["bob"])


def test_save_load_continue_equals_uninterrupted(tmp_path):
    straight = personalizer(tmp_path / "a", max_resident_adapters=2)
    resumed = personalizer(tmp_path / "b", max_resident_adapters=2)
    for period in range(2):
        for user in USERS:
            straight.observe(user, stream(user, period))
            resumed.observe(user, stream(user, period))
    resumed.save_pretrained(tmp_path / "state")
    del resumed
    loaded = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), tmp_path / "state", memory_kwargs={"encoder": HashingEncoder(32)}
    )
    assert loaded.users == list(USERS) and [loaded.period(u) for u in USERS] == [2, 2, 2]
    assert loaded.resident_users == [] and loaded.args.buffer_size == 3 and loaded.args.learning_rate == 5e-2
    assert loaded.max_resident_adapters == 2
    for user in USERS:
        assert [i.id for i in loaded.memory.buffer(user)] == [i.id for i in straight.memory.buffer(user)]
    for user in USERS:
        a = straight.observe(user, stream(user, 2))
        b = loaded.observe(user, stream(user, 2))
        assert a.selected_ids == b.selected_ids and a.buffer_ids == b.buffer_ids
        assert a.scores == b.scores  # the base log-prob cache came back exactly
    # Exact, not approximate: the same seeds, the same data order and bit-exact safetensors round trips.
    assert_same_adapters(adapters_of(straight), adapters_of(loaded))


def test_saved_layout_is_peft_multi_adapter(tmp_path):
    from peft import PeftModel

    p = personalizer(tmp_path, max_resident_adapters=1)
    for user in ("alice", "Ron Dicker"):
        p.observe(user, make_interactions(user, 4, prefix=user.replace(" ", "")))
    p.save_pretrained(tmp_path / "state")
    root = tmp_path / "state"
    for name in ("alice", "Ron_Dicker"):
        assert (root / "adapters" / name / "adapter_model.safetensors").is_file()
    for name in ("continual_state.json", "training_args.json", "base_logprobs.json", "spring_config.json",
                 "README.md", "memory/config.json"):  # fmt: skip
        assert (root / name).is_file(), name
    state = json.loads((root / "continual_state.json").read_text())
    assert state["users"]["Ron Dicker"] == {"adapter": "Ron_Dicker", "next_period": 1, "num_observed": 4}
    for user, name in (("alice", "alice"), ("Ron Dicker", "Ron_Dicker")):
        loaded = PeftModel.from_pretrained(
            make_model("llama", TRAINING_VOCAB.size), root / "adapters", subfolder=name, adapter_name=name
        )
        from peft import get_peft_model_state_dict

        got = get_peft_model_state_dict(loaded, adapter_name=name)
        expected = p.state_dict(user)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_spring_model_routes_users_to_their_adapters(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    p.observe("bob", stream("bob", 0))
    spring = p.to_spring_model()
    tok = p.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": "cats w1"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)  # fmt: skip
    out = spring.generate(**inputs, personalization="bob", max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert spring.last_personalization[0].adapter == "bob"


def test_directory_loads_as_spring_for_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    from transformers_spring.generation import SpringForCausalLM

    make_model("llama", TRAINING_VOCAB.size).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    p = ContinualPersonalizer(
        base, make_tokenizer(TRAINING_VOCAB, chat=True), make_args(tmp_path, buffer_size=3), make_buffer_memory()
    )
    p.observe("alice", stream("alice", 0))
    p.observe("alice", stream("alice", 1))
    p.save_pretrained(tmp_path / "state")
    spring = SpringForCausalLM.from_pretrained(tmp_path / "state", memory_kwargs={"encoder": HashingEncoder(32)})
    assert "alice" in spring.base_model.peft_config
    assert [i.id for i in spring.memory.buffer("alice")] == [i.id for i in p.memory.buffer("alice")]


def test_push_to_hub_is_one_private_commit(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    uploaded = {}

    def fake_upload(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded["files"] = sorted(
            str(f.relative_to(folder_path)) for f in Path(folder_path).rglob("*") if f.is_file()
        )
        uploaded["repo_id"] = repo_id
        return "commit"

    create = mock.MagicMock(return_value=mock.Mock(repo_id="me/spring"))
    with (
        mock.patch.object(HfApi, "create_repo", create),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake_upload) as upload,
    ):
        assert p.push_to_hub("me/spring") == "commit"
    assert upload.call_count == 1 and create.call_args.kwargs["private"] is True
    assert uploaded["repo_id"] == "me/spring"
    assert upload.call_args.kwargs["delete_patterns"] == ["adapters/**", "memory/**"]  # forgotten users leave the repo
    assert (
        "continual_state.json" in uploaded["files"] and "adapters/alice/adapter_model.safetensors" in uploaded["files"]
    )


def test_interrupted_save_keeps_the_previous_version(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    target = tmp_path / "state"
    p.save_pretrained(target)
    p.observe("alice", stream("alice", 1))

    def crash(directory, save_tokenizer):
        (directory / "partial").write_text("x")
        raise OSError("disk full")

    with mock.patch.object(p, "_write", side_effect=crash), pytest.raises(OSError, match="disk full"):
        p.save_pretrained(target)
    state = json.loads((target / "continual_state.json").read_text())
    assert state["users"]["alice"]["next_period"] == 1  # the previous version is intact
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".state")) == []
    assert not (target / "partial").exists() and not [x for x in target.iterdir() if x.name.startswith(".spring")]
    p.save_pretrained(target)
    assert json.loads((target / "continual_state.json").read_text())["users"]["alice"]["next_period"] == 2


def test_bad_inputs_are_clear_and_lose_nothing(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    before = p.state_dict("alice")
    with pytest.raises(KeyError, match="unknown user 'zoe'"):
        p.adapter_name("zoe")
    with pytest.raises(KeyError, match="unknown user 'zoe'"):
        p.state_dict("zoe")
    with pytest.raises(ValueError, match=r"interactions\[0\]\.user_id"):
        p.observe("alice", stream("bob", 1))
    with pytest.raises(ValueError, match=r"missing"):
        p.observe("alice", [{"user_id": "alice", "prompt": "w1"}])
    with pytest.raises(TypeError, match="user_id"):
        p.observe(42, stream("alice", 1))
    out = p.observe("alice", [])
    assert out.skipped and p.period("alice") == 1
    p.observe("a b", make_interactions("a b", 2, prefix="ab"))
    with pytest.raises(ValueError, match="same adapter name 'a_b'"):
        p.observe("a_b", make_interactions("a_b", 2))
    after = p.state_dict("alice")
    assert all(torch.equal(before[k], after[k]) for k in before) and p.period("alice") == 1
    with pytest.raises(FileNotFoundError):
        ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="max_resident_adapters"):
        personalizer(tmp_path, max_resident_adapters=0)


def test_failed_first_period_can_be_retried(tmp_path):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    clean = personalizer(tmp_path / "a")
    clean.observe("alice", stream("alice", 0))
    p = personalizer(tmp_path / "b")
    with pytest.raises(RuntimeError, match="boom"):
        p.observe("alice", stream("alice", 0), callbacks=[Boom()])  # the very first adapter: peft cannot delete it
    assert p.users == [] and p.period("alice") == 0
    p.observe("alice", stream("alice", 0))
    assert_same_adapters(adapters_of(clean), adapters_of(p))


def test_users_keep_their_order_through_save_and_load(tmp_path):
    p = personalizer(tmp_path)
    for user in ("zoe", "alice", "mike"):
        p.observe(user, make_interactions(user, 2))
    p.save_pretrained(tmp_path / "state")
    loaded = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), tmp_path / "state", memory_kwargs={"encoder": HashingEncoder(32)}
    )
    assert loaded.users == ["zoe", "alice", "mike"]


def test_save_keeps_the_users_logs_and_checkpoints(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    out = tmp_path / "out"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "train.log").write_text("log")
    (out / "checkpoints" / "step-1" / "weights.bin").write_bytes(b"w")
    p.save_pretrained(out)
    p.observe("alice", stream("alice", 1))
    p.save_pretrained(out)
    assert (out / "train.log").read_text() == "log" and (out / "checkpoints" / "step-1" / "weights.bin").is_file()
    assert json.loads((out / "continual_state.json").read_text())["users"]["alice"]["next_period"] == 2


def test_forget_user_erases_adapter_state_cache_and_memory_from_the_next_save(tmp_path):
    from testing_utils import find_traces

    from transformers_spring.memory import Interaction

    p = personalizer(tmp_path, max_resident_adapters=1)  # bob's adapter gets offloaded to disk
    secret = [Interaction("zq-bob", f"w{i} w{i + 1} zqsecret", f"w{i + 2} zqreply", timestamp=2e9 + i)
              for i in range(6)]  # fmt: skip
    p.observe("zq-bob", secret)
    p.observe("alice", stream("alice", 0))
    out = tmp_path / "out"
    p.save_pretrained(out)
    assert find_traces(out, "zq-bob") and (out / "adapters" / "zq-bob").is_dir()
    assert p.forget_user("zq-bob") and not p.forget_user("zq-bob")
    assert p.users == ["alice"] and "zq-bob" not in p.adapter_pool
    p.save_pretrained(out)
    assert find_traces(out, "zq-bob", "zqsecret", "zqreply") == []
    assert not (out / "adapters" / "zq-bob").exists()
    p.observe("alice", stream("alice", 1))  # the others carry on
    assert ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out).users == ["alice"]


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"adapter": "../../payload"}, "users.alice.adapter"),
        ({"next_period": -1}, "next_period"),
        ({"next_period": "2"}, "next_period"),
        ({"num_observed": True}, "num_observed"),
    ],
)
def test_names_and_counters_from_the_state_file_are_checked(tmp_path, edit, match):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    out = tmp_path / "out"
    p.save_pretrained(out)
    state = json.loads((out / "continual_state.json").read_text())
    state["users"]["alice"].update(edit)
    (out / "continual_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=match):
        ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out)
    assert not (tmp_path / "payload").exists()
    state["users"] = {"../x": state["users"]["alice"]}
    (out / "continual_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="invalid user id"):
        ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out)


def test_the_adapter_naming_template_is_used_saved_and_checked(tmp_path):
    from transformers_spring import SpringConfig

    p = personalizer(tmp_path, spring_config=SpringConfig(adapter_name_template="user-{user_id}"))
    p.observe("alice", stream("alice", 0))
    p.observe("Ron Dicker", make_interactions("Ron Dicker", 4, prefix="RonDicker"))
    assert p.adapter_name("Ron Dicker") == "user-Ron_Dicker" and "user-alice" in p.model.peft_config
    spring = p.to_spring_model()
    assert spring.spring_config.adapter_name_template == "user-{user_id}"
    tok = p.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": "cats w1"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)  # fmt: skip
    spring.generate(**inputs, personalization="alice", max_new_tokens=2, do_sample=False)
    assert spring.last_personalization[0].adapter == "user-alice"  # routed to the adapter, not the base model
    with pytest.raises(ValueError, match="adapter_name_template"):
        p.to_spring_model(SpringConfig())  # another template: refused, never a silent fall back to the base model
    out = tmp_path / "state"
    p.save_pretrained(out)
    assert json.loads((out / "continual_state.json").read_text())["adapter_name_template"] == "user-{user_id}"
    assert (out / "adapters" / "user-Ron_Dicker" / "adapter_model.safetensors").is_file()
    loaded = ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out)
    assert loaded.adapter_name_template == "user-{user_id}" and loaded.adapter_name("alice") == "user-alice"
    assert_same_adapters(adapters_of(p), adapters_of(loaded))
    with pytest.raises(ValueError, match="adapter_name_template"):
        ContinualPersonalizer.from_pretrained(
            make_model("llama", TRAINING_VOCAB.size), out, spring_config=SpringConfig()
        )
    state = json.loads((out / "continual_state.json").read_text())
    state["adapter_name_template"] = "{user_id}"  # names that do not follow the template are refused
    (out / "continual_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="users.alice.adapter"):
        ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out)


def test_a_state_without_a_naming_template_means_the_user_id(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    out = tmp_path / "state"
    p.save_pretrained(out)
    state = json.loads((out / "continual_state.json").read_text())
    assert state.pop("adapter_name_template") == "{user_id}"
    (out / "continual_state.json").write_text(json.dumps(state))  # as saved before the key existed
    loaded = ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out)
    assert loaded.adapter_name_template == "{user_id}" and loaded.adapter_name("alice") == "alice"


def test_from_pretrained_takes_the_model_first_and_still_reads_the_old_order(tmp_path, caplog, monkeypatch):
    from transformers.utils import logging

    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    p.save_pretrained(tmp_path / "state")
    monkeypatch.undo()  # conftest fails any deprecation our code logs; this one is the point of the test
    logging.enable_propagation()
    try:
        old = ContinualPersonalizer.from_pretrained(tmp_path / "state", make_model("llama", TRAINING_VOCAB.size))
    finally:
        logging.disable_propagation()
    assert "deprecated" in caplog.text and "from_pretrained(model, path)" in caplog.text
    assert old.users == ["alice"]
    assert_same_adapters(adapters_of(p), adapters_of(old))


def test_save_pretrained_can_push_to_hub(tmp_path):
    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    with mock.patch.object(ContinualPersonalizer, "push_to_hub", autospec=True) as push:
        p.save_pretrained(tmp_path / "my-state", push_to_hub=True, private=False)
        p.save_pretrained(tmp_path / "my-state", push_to_hub=True, repo_id="me/other")
        p.save_pretrained(tmp_path / "my-state")
    assert [c.args[1:] for c in push.call_args_list] == [("my-state",), ("me/other",)]
    assert push.call_args_list[0].kwargs == {"private": False}
    assert (tmp_path / "my-state" / "continual_state.json").is_file()


# ------------------------------------------------------------------------------------------------ learning_rate="auto"
class TrainerSpy:
    """Records the learning rate and adapter of every SpringTrainer the personalizer builds."""

    def __init__(self, monkeypatch):
        from transformers_spring.training import continual

        self.runs = []
        real = continual.SpringTrainer
        runs = self.runs

        class Spy(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                runs.append((self.adapter_name, self.args.learning_rate))

        monkeypatch.setattr(continual, "SpringTrainer", Spy)


def fake_scorer(monkeypatch, nlls):
    """Replaces the held-out scorer: the i-th call returns `nlls[i]`; records the held-out ids and active adapter."""
    from transformers_spring.training import continual

    calls = []

    def score(model, samples, args, pad_token_id):
        calls.append(([s.id for s in samples], model.active_adapter))
        return nlls[len(calls) - 1]

    monkeypatch.setattr(continual, "held_out_nll", score)
    return calls


@pytest.mark.parametrize("nlls, chosen", [((2.0, 1.0), 3e-3), ((1.0, 2.0), 1e-3), ((1.5, 1.5), 1e-3)])
def test_auto_learning_rate_is_chosen_once_by_validation(tmp_path, monkeypatch, nlls, chosen):
    spy = TrainerSpy(monkeypatch)
    calls = fake_scorer(monkeypatch, nlls)
    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, learning_rate="auto", num_train_epochs=1))
    assert p.args.learning_rate == "auto" and p.learning_rate_choice is None
    p.observe("alice", stream("alice", 0, n=4))  # too few items to search: the size default, for now
    assert p.learning_rate_choice == {"learning_rate": 3e-3, "rule": "size default", "grid": [],
                                      "num_parameters": p.learning_rate_choice["num_parameters"]}  # fmt: skip
    assert calls == [] and spy.runs == [("alice", 3e-3)]
    bob = stream("bob", 0, n=12)
    p.observe("bob", list(reversed(bob)))  # the held-out items are the latest by time, whatever the order given
    assert [ids for ids, _ in calls] == [["bob-10", "bob-11"]] * 2
    search = [name for name, _ in spy.runs[1:3]]
    assert search[0] == search[1] and search[0].startswith("__spring_lr_search_")  # one throwaway, reset per rate
    assert [adapter for _, adapter in calls] == search
    assert spy.runs[1:] == [(search[0], 1e-3), (search[0], 3e-3), ("bob", chosen)]  # 1e-3, 3e-3 (= size default)
    assert p.learning_rate_choice["rule"] == "validation" and p.learning_rate_choice["learning_rate"] == chosen
    assert p.learning_rate_choice["grid"] == [{"learning_rate": 1e-3, "validation_nll": nlls[0]},
                                              {"learning_rate": 3e-3, "validation_nll": nlls[1]}]  # fmt: skip
    assert (p.learning_rate_choice["fit_items"], p.learning_rate_choice["validation_items"]) == (10, 2)
    assert sorted(p.model.peft_config) == ["alice", "bob"]  # the throwaway adapter is gone
    p.observe("carol", stream("carol", 0, n=12))  # chosen once: no second search
    p.observe("alice", stream("alice", 1, n=4))
    assert len(calls) == 2 and spy.runs[-2:] == [("carol", chosen), ("alice", chosen)]
    assert p.args.learning_rate == "auto"  # the arguments still say what was asked


def test_the_learning_rate_choice_survives_save_and_load(tmp_path, monkeypatch):
    calls = fake_scorer(monkeypatch, (2.0, 1.0))
    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, learning_rate="auto", num_train_epochs=1))
    p.observe("bob", stream("bob", 0, n=12))
    p.save_pretrained(tmp_path / "state")
    state = json.loads((tmp_path / "state" / "continual_state.json").read_text())
    assert state["learning_rate_choice"] == p.learning_rate_choice
    assert json.loads((tmp_path / "state" / "training_args.json").read_text())["learning_rate"] == "auto"
    assert "bob" not in json.dumps(state["learning_rate_choice"])  # no trace of the user it was chosen on
    monkeypatch.setattr("transformers_spring.training.continual.held_out_nll", mock.Mock(side_effect=AssertionError))
    spy = TrainerSpy(monkeypatch)
    loaded = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), tmp_path / "state", memory_kwargs={"encoder": HashingEncoder(32)}
    )
    assert loaded.args.learning_rate == "auto" and loaded.learning_rate_choice == p.learning_rate_choice
    loaded.observe("carol", stream("carol", 0, n=12))  # no new search
    assert spy.runs == [("carol", 3e-3)] and len(calls) == 2
    # Given explicit arguments, the saved choice does not apply.
    explicit = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), tmp_path / "state", args=make_args(tmp_path, learning_rate=2e-2),
        memory_kwargs={"encoder": HashingEncoder(32)},
    )  # fmt: skip
    assert explicit.learning_rate_choice is None
    # A state saved before the choice existed still loads (and chooses when it first needs to).
    del state["learning_rate_choice"]
    (tmp_path / "state" / "continual_state.json").write_text(json.dumps(state))
    old = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), tmp_path / "state", memory_kwargs={"encoder": HashingEncoder(32)}
    )
    assert old.learning_rate_choice is None and old.users == ["bob"]


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"rule": "guess"}, r"'learning_rate_choice\.rule'"),
        ({"learning_rate": -1}, r"'learning_rate_choice\.learning_rate'"),
        ({"learning_rate": "3e-3"}, r"'learning_rate_choice\.learning_rate'"),
        ({"grid": [{"learning_rate": 1e-3, "validation_nll": "low"}]}, r"'learning_rate_choice\.grid\[0\]"),
        ({"fit_items": -2}, r"'learning_rate_choice\.fit_items'"),
    ],
)
def test_a_bad_learning_rate_choice_in_the_state_file_is_named(tmp_path, edit, match):
    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, learning_rate="auto", num_train_epochs=1))
    p.observe("alice", stream("alice", 0, n=3))
    p.save_pretrained(tmp_path / "state")
    path = tmp_path / "state" / "continual_state.json"
    state = json.loads(path.read_text())
    state["learning_rate_choice"].update(edit)
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=match):
        ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), tmp_path / "state")


def test_auto_search_on_a_tiny_model_picks_the_lowest_held_out_nll(tmp_path):
    from transformers_spring.training import SpringFormatter, SpringTrainer
    from transformers_spring.training.continual import held_out_nll

    args = make_args(tmp_path, buffer_size=3, learning_rate="auto", num_train_epochs=1)
    p = personalizer(tmp_path, args=args)
    bob = stream("bob", 0, n=12)
    p.observe("bob", bob)
    choice = p.learning_rate_choice
    nlls = [entry["validation_nll"] for entry in choice["grid"]]
    assert [entry["learning_rate"] for entry in choice["grid"]] == [1e-3, 3e-3] and all(n > 0 for n in nlls)
    assert choice["rule"] == "validation" and choice["learning_rate"] == [1e-3, 3e-3][nlls.index(min(nlls))]
    assert list(p.model.peft_config) == ["bob"]  # the throwaway adapter is gone (it was the model's first)
    # Each recorded NLL is that of a fresh LoRA trained at its rate on the first 10 items, scored on the last 2.
    tokenizer = make_tokenizer(TRAINING_VOCAB, chat=True)
    samples = SpringFormatter.from_args(tokenizer, args).encode_many(bob[10:])
    for rate, expected in zip((1e-3, 3e-3), nlls, strict=True):
        trainer = SpringTrainer(model=make_model("llama", TRAINING_VOCAB.size), args=args.with_learning_rate(rate),
                                user_id="bob", train_interactions=bob[:10], processing_class=tokenizer,
                                adapter_name="__spring_lr_search_0")  # fmt: skip
        trainer.run_period()
        assert held_out_nll(trainer.model, samples, args, tokenizer.pad_token_id) == pytest.approx(expected, abs=1e-5)


def test_the_preset_is_saved_and_an_older_state_reads_as_the_papers(tmp_path):
    args = make_args(tmp_path, buffer_size=3, spring_preset="paper", learning_rate=None)  # None: the preset's
    p = personalizer(tmp_path, args=args)
    p.observe("alice", stream("alice", 0))
    p.save_pretrained(tmp_path / "state")
    path = tmp_path / "state" / "training_args.json"
    saved = json.loads(path.read_text())
    assert (saved["spring_preset"], saved["learning_rate"], saved["selection_ratio"]) == ("paper", 1e-4, 0.3)
    load = lambda: ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), tmp_path / "state")  # noqa: E731
    assert (load().args.spring_preset, load().args.learning_rate, load().args.selection_ratio) == ("paper", 1e-4, 0.3)
    # The measured preset is written too (at its default): a file without it is from before presets existed.
    p = personalizer(tmp_path / "m", args=make_args(tmp_path / "m", buffer_size=3, selection_ratio=None))
    p.observe("alice", stream("alice", 0))
    p.save_pretrained(tmp_path / "state")
    saved = json.loads(path.read_text())
    assert (saved["spring_preset"], saved["learning_rate"], saved["selection_ratio"]) == ("measured", 5e-2, 1.0)
    assert (load().args.spring_preset, load().args.selection_ratio) == ("measured", 1.0)
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("spring_preset", "selection_ratio")}))
    old = load().args  # what an earlier release saved: the fields it left out had the paper's defaults
    assert (old.spring_preset, old.learning_rate, old.selection_ratio) == ("paper", 5e-2, 0.3)


def test_a_float_learning_rate_is_used_as_given(tmp_path, monkeypatch):
    spy = TrainerSpy(monkeypatch)
    calls = fake_scorer(monkeypatch, ())
    p = personalizer(tmp_path)
    p.observe("bob", stream("bob", 0, n=12))
    assert calls == [] and spy.runs == [("bob", 5e-2)] and p.learning_rate_choice is None
    p.save_pretrained(tmp_path / "state")
    assert "learning_rate_choice" not in json.loads((tmp_path / "state" / "continual_state.json").read_text())


# ------------------------------------------------------------------------------------------------ serving export
# The tiny architectures (testing_utils.ARCHS) vLLM serves LoRA adapters for (vLLM 0.33: a `SupportsLoRA` model
# class; GPT-NeoX through its Transformers backend). vLLM's GPT-2 class does not support LoRA.
VLLM_LORA_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt_neox")


@pytest.mark.parametrize("arch", VLLM_LORA_ARCHS)
def test_export_for_serving_round_trips_bit_identical(tmp_path, arch):
    from peft import PeftModel, get_peft_model_state_dict

    from transformers_spring.persistence.serving import read_serving_manifest, vllm_lora_problems

    p = ContinualPersonalizer(
        make_model(arch, TRAINING_VOCAB.size),
        make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3, num_train_epochs=1),
        make_buffer_memory(),
        max_resident_adapters=1,  # one adapter resident, one offloaded: both export paths
    )
    for user in ("alice", "Ron Dicker"):
        p.observe(user, make_interactions(user, 4, prefix=user.replace(" ", "")))
    manifest = p.export_for_serving(tmp_path / "serve")
    assert [(a["user_id"], a["lora_name"], a["lora_int_id"], a["rank"]) for a in manifest["adapters"]] == [
        ("alice", "alice", 1, 8),
        ("Ron Dicker", "Ron_Dicker", 2, 8),
    ]
    assert read_serving_manifest(tmp_path / "serve")["max_lora_rank"] == 16
    for entry in read_serving_manifest(tmp_path / "serve")["adapters"]:
        assert vllm_lora_problems(entry["path"]) == []
        loaded = PeftModel.from_pretrained(make_model(arch, TRAINING_VOCAB.size), entry["path"])
        got = get_peft_model_state_dict(loaded)
        expected = p.state_dict(entry["user_id"])
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_export_for_serving_refuses_what_vllm_would(tmp_path):
    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, num_train_epochs=1, lora_r=32))
    p.observe("alice", stream("alice", 0))
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"field 'r' \(or 'rank_pattern'\) is 32, above the server's max_lora_rank 16"
    ):
        p.export_for_serving(tmp_path / "serve")
    assert sorted(x.name for x in (tmp_path / "serve").iterdir()) == ["notes.txt"]  # nothing half-written
    manifest = p.export_for_serving(tmp_path / "serve", max_lora_rank=32)
    assert manifest["adapters"][0]["rank"] == 32 and (tmp_path / "serve" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="max_lora_rank"):
        p.export_for_serving(tmp_path / "serve", max_lora_rank=24)
    with pytest.raises(KeyError, match="nobody"):
        p.export_for_serving(tmp_path / "serve", users=["nobody"])
    with pytest.raises(TypeError, match="`users`"):
        p.export_for_serving(tmp_path / "serve", users="alice")


def test_export_for_serving_records_the_base_model_id_given(tmp_path):
    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, num_train_epochs=1))
    p.observe("alice", stream("alice", 0))
    manifest = p.export_for_serving(tmp_path / "serve", base_model_id="org/tiny-llama")
    assert manifest["base_model_name_or_path"] == "org/tiny-llama"
    # vLLM's filesystem LoRA resolver serves a folder only when its adapter_config names the served model.
    (entry,) = manifest["adapters"]
    config = json.loads((tmp_path / "serve" / entry["path"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    with pytest.raises(ValueError, match="`base_model_id`"):
        p.export_for_serving(tmp_path / "other", base_model_id="/not/a/repo/id")
    assert not (tmp_path / "other").exists()


def test_export_for_serving_warns_for_a_model_vllm_cannot_adapt(tmp_path, caplog):
    p = ContinualPersonalizer(
        make_model("gpt2", TRAINING_VOCAB.size),
        make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3, num_train_epochs=1),
        make_buffer_memory(),
    )
    p.observe("alice", stream("alice", 0))
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        p.export_for_serving(tmp_path / "serve")
    finally:
        logging.disable_propagation()
    assert "gpt2" in caplog.text and "vLLM" in caplog.text


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_serving_recipes_reproduce_spring_at_lambda_0_and_1(tmp_path, weight):
    """docs/serving.md's recipes, with peft + greedy `generate` standing in for the server, decode what
    SpringForCausalLM decodes at λ = 0 (adapter only) and λ = 1 (adapter plus history in the prompt)."""
    from peft import PeftModel

    from transformers_spring.generation import HistoryPromptBuilder, SpringConfig
    from transformers_spring.persistence.serving import read_serving_manifest

    p = personalizer(tmp_path)
    p.observe("alice", stream("alice", 0))
    p.observe("alice", stream("alice", 1))
    config = SpringConfig(interpolation_weight=weight, gate=-1.0, top_k=2)  # BM25 over 2 items scores 0
    spring = p.to_spring_model(config)
    tok = p.tokenizer
    query = p.memory.buffer("alice")[0].prompt  # a prompt the buffer holds: BM25 finds it
    text = tok.apply_chat_template([{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    expected = spring.generate(torch.tensor([ids]), personalization="alice", max_new_tokens=6, do_sample=False)
    assert spring.last_personalization[0].items  # the gate is open: at λ = 1 the history path decides

    entry = read_serving_manifest(p.export_for_serving(tmp_path / "serve") and tmp_path / "serve")["adapters"][0]
    served = PeftModel.from_pretrained(make_model("llama", TRAINING_VOCAB.size), entry["path"]).eval()
    if weight == 1.0:
        builder = HistoryPromptBuilder(tok, config)
        context = p.memory.retrieve_context(
            "alice", builder.query_text(ids), k=config.top_k, use_global=config.use_global
        )
        items = [item for item in context.items if item.score is None or item.score > config.gate]
        ids = builder.build(ids, items)
    got = served.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                          pad_token_id=tok.pad_token_id)  # fmt: skip
    assert got[0, len(ids) :].tolist() == expected[0, -6:].tolist()


def test_lora_int_ids_are_stable_and_never_reused(tmp_path):
    from transformers_spring.persistence.serving import read_serving_manifest

    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, num_train_epochs=1))
    for user in ("alice", "bob", "carol"):
        p.observe(user, stream(user, 0))
    ids = lambda m: {a["user_id"]: a["lora_int_id"] for a in m["adapters"]}  # noqa: E731
    first = ids(p.export_for_serving(tmp_path / "serve"))
    assert first == {"alice": 1, "bob": 2, "carol": 3}
    assert ids(p.export_for_serving(tmp_path / "serve")) == first  # unchanged weights keep their ids
    p.observe("bob", stream("bob", 1))  # new weights: a new id, the old one retired
    p.forget_user("carol")  # gone: her id is retired, never given to anyone else
    p.observe("dave", stream("dave", 0))
    manifest = p.export_for_serving(tmp_path / "serve")
    assert ids(manifest) == {"alice": 1, "bob": 4, "dave": 5}
    assert manifest["retired_lora_int_ids"] == [2, 3]
    assert read_serving_manifest(tmp_path / "serve")["retired_lora_int_ids"] == [2, 3]


def test_a_tampered_serving_manifest_is_refused(tmp_path):
    from transformers_spring.persistence.serving import read_serving_manifest

    p = personalizer(tmp_path, args=make_args(tmp_path, buffer_size=3, num_train_epochs=1))
    for user in ("alice", "bob"):
        p.observe(user, stream(user, 0))
    p.export_for_serving(tmp_path / "serve")
    path = tmp_path / "serve" / "serving_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["adapters"][1]["lora_int_id"] = 1  # two users under one id
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"adapters\[1\]\.lora_int_id"):
        read_serving_manifest(tmp_path / "serve")
    path.write_text("{oops")
    with pytest.raises(ValueError, match="serving_manifest.json is not valid JSON"):
        p.export_for_serving(tmp_path / "serve")


# ------------------------------------------------------------------------------------------------ community adapters
TOPIC_WORDS = {"cats": ("cats dogs", 0), "vote": ("vote rain", 40)}
GROUPS = {"cats": ("a0", "a1", "a2"), "vote": ("b0", "b1", "b2", "b3")}


def topic_items(user, topic, n=6, start=0):
    from transformers_spring.memory import Interaction

    words, off = TOPIC_WORDS[topic]
    return [
        Interaction(user, f"{words} w{off + (3 * i) % 40} w{off + (7 * i + 1) % 40}", f"{words.split()[0]} w{off + i}",
                    timestamp=1e9 + start + i, id=f"{user}-{start + i}")
        for i in range(start, start + n)
    ]  # fmt: skip


def saved_base(tmp_path):
    """A tiny base model loaded from a folder, so that a SPRInG folder names it (`base_model_name_or_path`)."""
    from transformers import AutoModelForCausalLM

    if not (tmp_path / "base").is_dir():
        make_model("llama", TRAINING_VOCAB.size).save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base")


def community_personalizer(tmp_path, model=None, **kwargs):
    from transformers_spring.memory import LoGoMemory

    memory = LoGoMemory(HashingEncoder(32), scorer="bm25", gate=None, num_threads=1, n_communities=2)
    p = ContinualPersonalizer(
        model if model is not None else make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3), memory, **kwargs,
    )  # fmt: skip
    for topic, users in GROUPS.items():
        for user in users:
            memory.add_many(topic_items(user, topic))
    return p


def lora_weights(model, name):
    """An adapter's LoRA tensors keyed without the adapter's name (comparable across adapters)."""
    return {k.replace(f".{name}.", "."): v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


def names_by_topic(table):
    return {("cats" if "a0" in a.members or "a1" in a.members else "vote"): a.name for a in table}


def test_community_adapters_are_trained_per_community_and_route_users_without_an_adapter(tmp_path):
    p = community_personalizer(tmp_path)
    table = p.train_community_adapters(min_users=3, progress=False)
    assert sorted(sorted(a.members) for a in table) == [["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"]]
    assert [a.num_items for a in table] == [18, 24] or [a.num_items for a in table] == [24, 18]
    by_topic = names_by_topic(table)
    assert set(by_topic.values()) == {"__community_0", "__community_1"}
    assert p.users == []  # community adapters are not users
    assert p.train_community_adapters(min_users=4, progress=False).names == ["__community_0"]  # cats: only 3 users
    table = p.train_community_adapters(min_users=3, progress=False)
    by_topic = names_by_topic(table)

    p.memory.add_many(topic_items("newbie", "vote", n=2, start=50))  # history, no adapter
    spring = p.to_spring_model()
    tok = p.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": "vote rain w41"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)  # fmt: skip
    from transformers_spring.generation import Personalization

    plan = spring.plan(inputs["input_ids"], inputs["attention_mask"], personalization=["newbie"])
    assert plan[0].adapter == by_topic["vote"]
    routed = spring.generate(**inputs, personalization="newbie", max_new_tokens=4, do_sample=False)
    explicit = spring.generate(
        **inputs, personalization=Personalization(user="newbie", adapter=by_topic["vote"]), max_new_tokens=4,
        do_sample=False,
    )  # fmt: skip
    assert torch.equal(routed, explicit)
    base = spring.generate(
        **inputs, personalization=Personalization(user="newbie", adapter="__base__"), max_new_tokens=4,
        do_sample=False,
    )  # fmt: skip
    assert not torch.equal(routed, base)  # the community adapter is not the base model
    # A user the memory does not know has no vector: the base model.
    assert spring.plan(inputs["input_ids"], inputs["attention_mask"], personalization=["stranger"])[0].adapter == (
        "__base__"
    )
    with pytest.raises(ValueError, match="community adapter name"):
        p.observe("__community_0", topic_items("__community_0", "cats"))


def test_a_new_users_adapter_starts_from_their_community_adapter(tmp_path, monkeypatch):
    from transformers import Trainer
    from transformers.trainer_utils import TrainOutput

    for init in (True, False):
        p = community_personalizer(tmp_path / str(init), community_init=init)
        by_topic = names_by_topic(p.train_community_adapters(min_users=3, progress=False))
        with monkeypatch.context() as patch:  # no training step: the adapter keeps its starting weights
            patch.setattr(Trainer, "train", lambda self, *a, **k: TrainOutput(0, 0.0, {}))
            p.observe("fresh", topic_items("fresh", "cats", n=3, start=60))
        start = lora_weights(p.model, "fresh")
        community = lora_weights(p.model, by_topic["cats"])
        same = all(torch.equal(start[k], community[k]) for k in community)
        assert same is init and start.keys() == community.keys()
        assert p.community_adapters[by_topic["cats"]].initialized == (["fresh"] if init else [])
        if init:  # recorded, saved, and reported when a member of that community is erased
            p.save_pretrained(tmp_path / "init-state")
            saved = json.loads((tmp_path / "init-state" / "community_adapters.json").read_text())
            assert [a["initialized"] for a in saved["adapters"] if a["name"] == by_topic["cats"]] == [["fresh"]]
            report = p.forget_user("a0")  # cats falls to 2 members: dropped; fresh's adapter started from it
            assert report.dropped == [by_topic["cats"]] and report.derived_users == ["fresh"]
        if not init:  # peft's initialisation: B = 0
            assert all(not v.any() for k, v in start.items() if "lora_B" in k)


def test_forget_user_retrains_or_drops_the_community_adapters_they_trained(tmp_path):
    from testing_utils import find_traces

    p = community_personalizer(tmp_path)
    by_topic = names_by_topic(p.train_community_adapters(min_users=3, progress=False))
    before = lora_weights(p.model, by_topic["vote"])
    report = p.forget_user("b1")  # vote keeps 3 members: retrained without b1
    assert report and report.retrained == [by_topic["vote"]] and report.dropped == []
    assert p.community_adapters[by_topic["vote"]].members == ["b0", "b2", "b3"]
    assert p.community_adapters[by_topic["vote"]].num_items == 18
    after = lora_weights(p.model, by_topic["vote"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    report = p.forget_user("a2")  # cats falls to 2 members: dropped
    assert report.dropped == [by_topic["cats"]] and report.retrained == []
    assert p.community_adapters.names == [by_topic["vote"]] and by_topic["cats"] not in p.adapter_pool
    assert not p.forget_user("nobody")
    out = tmp_path / "state"
    p.save_pretrained(out)
    assert find_traces(out, "b1-", "a2-") == []  # no record id of theirs in any file
    saved = json.loads((out / "community_adapters.json").read_text())
    assert [a["members"] for a in saved["adapters"]] == [["b0", "b2", "b3"]]
    assert not (out / "adapters" / by_topic["cats"]).exists()


def test_community_adapters_survive_save_and_load(tmp_path):
    from transformers_spring.generation import SpringForCausalLM

    p = community_personalizer(tmp_path, model=saved_base(tmp_path))
    table = p.train_community_adapters(min_users=3, progress=False)
    p.memory.add_many(topic_items("newbie", "cats", n=2, start=50))
    out = tmp_path / "state"
    p.save_pretrained(out)
    manifest = json.loads((out / "spring_manifest.json").read_text())
    assert any(c["name"] == "communities" for c in manifest.get("components", []))
    loaded = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), out, memory_kwargs={"encoder": HashingEncoder(32)}
    )
    assert loaded.community_adapters.names == table.names
    for a in table:
        b = loaded.community_adapters[a.name]
        assert b.members == a.members and b.num_items == a.num_items and np.allclose(b.centroid, a.centroid)
        loaded.adapter_pool.make_resident(a.name)
        left, right = lora_weights(p.model, a.name), lora_weights(loaded.model, a.name)
        assert all(torch.equal(left[k], right[k]) for k in left)
    spring = SpringForCausalLM.from_pretrained(out, memory_kwargs={"encoder": HashingEncoder(32)})
    tok = p.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": "cats dogs w3"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)  # fmt: skip
    here = p.to_spring_model()
    plan = spring.plan(inputs["input_ids"], inputs["attention_mask"], personalization=["newbie"])
    assert plan[0].adapter == names_by_topic(table)["cats"]
    assert torch.equal(
        spring.generate(**inputs, personalization="newbie", max_new_tokens=4, do_sample=False),
        here.generate(**inputs, personalization="newbie", max_new_tokens=4, do_sample=False),
    )
    assert spring.forget_user("a0") and spring.community_adapters.contributed("a0") == []  # the wrapper drops


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"name": "../x"}, r"adapters\[0\]\.name"),
        ({"name": "__community_9"}, "has no adapter '__community_9'"),
        ({"members": ["ok", 3]}, r"adapters\[0\]\.members"),
        ({"members": []}, r"adapters\[0\]\.members"),
        ({"centroid": [float("nan")] * 32}, r"adapters\[0\]\.centroid"),
        ({"num_items": -1}, r"adapters\[0\]\.num_items"),
    ],
)
def test_a_hostile_community_file_is_refused_naming_the_field(tmp_path, edit, match):
    from transformers_spring.generation import SpringForCausalLM

    p = community_personalizer(tmp_path, model=saved_base(tmp_path))
    p.train_community_adapters(min_users=3, progress=False)
    out = tmp_path / "state"
    p.save_pretrained(out)
    path = out / "community_adapters.json"
    data = json.loads(path.read_text())
    data["adapters"][0].update(edit)
    path.write_text(json.dumps(data))  # (NaN is written as NaN, which json reads back)
    with pytest.raises(ValueError, match=match):
        ContinualPersonalizer.from_pretrained(
            make_model("llama", TRAINING_VOCAB.size), out, memory_kwargs={"encoder": HashingEncoder(32)}
        )
    with pytest.raises(ValueError, match=match):
        SpringForCausalLM.from_pretrained(out, memory_kwargs={"encoder": HashingEncoder(32)})


def test_a_member_who_stops_sharing_leaves_the_community_adapters(tmp_path):
    p = community_personalizer(tmp_path)
    by_topic = names_by_topic(p.train_community_adapters(min_users=3, progress=False))
    p.memory.set_sharing("b2", False)  # an opt-out: b2's items must leave every adapter they trained
    p.memory.set_sharing("a1", False)  # cats falls below 3 sharing members
    p.to_spring_model()
    assert p.community_adapters.names == [by_topic["vote"]]
    assert p.community_adapters[by_topic["vote"]].members == ["b0", "b1", "b3"]
    # A policy change withdraws every earlier opt-in: nothing is left to train on.
    p.memory.set_sharing_policy("consented")
    p.save_pretrained(tmp_path / "state")
    assert p.community_adapters.names == [] and not (tmp_path / "state" / "community_adapters.json").exists()


def test_a_wrapper_saves_only_the_community_adapters_it_holds(tmp_path):
    from transformers_spring.generation import SpringForCausalLM

    p = community_personalizer(tmp_path, model=saved_base(tmp_path), max_resident_adapters=2)
    table = p.train_community_adapters(min_users=3, progress=False)
    spring = p.to_spring_model()
    assert spring.community_adapters is p.community_adapters  # shared: a later erasure reaches the wrapper
    p.observe("fresh", topic_items("fresh", "cats", n=3, start=60))  # evicts the least recently used adapter
    held = [a.name for a in table if a.name in spring.base_model.peft_config]
    assert len(held) == 1
    spring.save_pretrained(tmp_path / "wrapped")
    saved = json.loads((tmp_path / "wrapped" / "community_adapters.json").read_text())
    assert [a["name"] for a in saved["adapters"]] == held
    loaded = SpringForCausalLM.from_pretrained(tmp_path / "wrapped", memory_kwargs={"encoder": HashingEncoder(32)})
    assert loaded.community_adapters.names == held
    assert loaded.forget_user("fresh") and all("fresh" not in a.initialized for a in loaded.community_adapters)
    # A user id that maps to a community adapter's name does not erase it.
    name = held[0]
    loaded.forget_user(name)
    assert name in loaded.base_model.peft_config
