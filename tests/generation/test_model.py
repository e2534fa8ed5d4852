"""SpringForCausalLM: delegation, argument handling, retrieval, per-user adapters, save / load / push."""

import contextlib
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import PAD, FakeMemory, make_model, make_tokenizer
from transformers import AutoModelForCausalLM, LogitsProcessorList

from transformers_spring.generation import (
    Personalization,
    RetrievalInterpolationLogitsProcessor,
    SpringConfig,
    SpringForCausalLM,
)
from transformers_spring.records import Interaction

NEW = 8
GREEDY = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD}


def encode(texts, tokenizer=None):
    return (tokenizer or make_tokenizer())(texts, return_tensors="pt", padding=True)


@pytest.fixture
def llama():
    return make_model("llama")


@pytest.fixture
def wrapper(llama, memory, tokenizer):
    return SpringForCausalLM(llama, memory=memory, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ basics
def test_attribute_access_falls_through(wrapper, llama):
    assert wrapper.config is llama.config
    assert wrapper.get_base_model() is llama
    assert wrapper.generation_config is llama.generation_config
    assert wrapper.spring_config.interpolation_weight == 0.25  # the measured default
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(wrapper(input_ids=ids).logits, llama(input_ids=ids).logits)


def test_without_personalization_output_is_the_wrapped_generate(wrapper, llama):
    batch = encode(["cats rain sun", "dogs"])
    assert torch.equal(wrapper.generate(**batch, **GREEDY), llama.generate(**batch, **GREEDY))
    assert torch.equal(
        wrapper.generate(**batch, personalization=None, repetition_penalty=1.2, **GREEDY),
        llama.generate(**batch, repetition_penalty=1.2, **GREEDY),
    )
    assert wrapper.memory.calls == []
    # A list of Nones is "no personalization" too.
    assert torch.equal(
        wrapper.generate(**batch, personalization=[None, None], **GREEDY), llama.generate(**batch, **GREEDY)
    )


@pytest.mark.parametrize(
    "personalization, error, match",
    [
        (42, TypeError, "personalization"),
        (["alice"], ValueError, "one entry per row"),
        (["alice", "bob", None], ValueError, "personalization"),
        ([{"user": "alice", "colour": 1}, None], TypeError, "personalization\\[0\\]"),
        (Personalization(user="alice", weight=0.5), None, None),
    ],
)
def test_bad_personalization_is_named(wrapper, personalization, error, match):
    batch = encode(["cats rain sun", "dogs"])
    if error is None:
        wrapper.generate(**batch, personalization=personalization, **GREEDY)
        return
    with pytest.raises(error, match=match):
        wrapper.generate(**batch, personalization=personalization, **GREEDY)


def test_bad_weight_and_settings_are_named(wrapper):
    batch = encode(["cats rain sun"])
    with pytest.raises(ValueError, match="weight"):
        wrapper.generate(**batch, personalization=Personalization(user="alice", weight=1.5), **GREEDY)
    with pytest.raises(ValueError, match="num_beams"):
        wrapper.generate(**batch, personalization="alice", num_beams=2, max_new_tokens=3, pad_token_id=PAD)
    with pytest.raises(ValueError, match="inputs_embeds"):
        wrapper.generate(inputs_embeds=torch.zeros(1, 3, 32), personalization="alice", max_new_tokens=3)
    with pytest.raises(ValueError, match="interpolation_weight"):
        SpringConfig(interpolation_weight=2.0)
    with pytest.raises(TypeError, match="memory"):
        SpringForCausalLM(wrapper.base_model, memory=object())


def test_fused_mode_refuses_synced_gpus_through_the_wrapper(wrapper):
    # generate() drops `synced_gpus` before calling a custom_generate callable, so the wrapper must refuse it.
    batch = encode(["cats rain sun"])
    with pytest.raises(ValueError, match="synced_gpus"):
        wrapper.generate(**batch, personalization="alice", synced_gpus=True, **GREEDY)
    wrapper.spring_config = SpringConfig(mode="processor")
    wrapper.generate(**batch, personalization="alice", synced_gpus=False, **GREEDY)


def test_missing_memory_or_tokenizer_is_explained(llama, memory):
    batch = encode(["cats rain sun"])
    with pytest.raises(ValueError, match="memory"):
        SpringForCausalLM(llama, tokenizer=make_tokenizer()).generate(**batch, personalization="alice", **GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        SpringForCausalLM(llama, memory=memory).generate(**batch, personalization="alice", **GREEDY)


def test_retrieval_arguments(wrapper, memory):
    batch = encode(["cats rain sun", "dogs vote"])
    wrapper.generate(
        **batch,
        personalization=[
            "alice",
            Personalization(user="bob", query="sun", top_k=1, use_global=False, retrieval_kwargs={"before": 5}),
        ],
        **GREEDY,
    )
    assert memory.calls[0] == {"user_id": "alice", "query": "cats rain sun", "k": 2, "use_global": True}
    assert memory.calls[1] == {"user_id": "bob", "query": "sun", "k": 1, "use_global": False, "before": 5}
    alice, bob = wrapper.last_personalization
    assert [hit.interaction.prompt for hit in alice.items] == ["cats rain", "cats sun"]
    assert [hit.interaction.prompt for hit in bob.items] == ["sun"]


def test_float_gate_and_memory_weight(llama, tokenizer):
    memory = FakeMemory({"alice": [("cats rain", "w1"), ("w2", "w3")]}, weight=0.2)
    config = SpringConfig(gate=1.5, interpolation_weight=0.5)
    wrapper = SpringForCausalLM(llama, memory=memory, config=config, tokenizer=tokenizer)
    wrapper.generate(**encode(["cats rain sun"]), personalization="alice", **GREEDY)
    info = wrapper.last_personalization[0]
    assert [hit.score > 1.5 for hit in info.items] == [True]  # the second item (score 0.5) is gated out
    assert info.weight == 0.5
    wrapper.spring_config = SpringConfig(use_memory_weight=True)
    wrapper.generate(**encode(["cats rain sun"]), personalization="alice", **GREEDY)
    assert wrapper.last_personalization[0].weight == 0.2
    # A per-call gate closes it entirely: plain generation.
    out = wrapper.generate(**encode(["cats rain sun"]), personalization=Personalization("alice", gate=99.0), **GREEDY)
    assert not wrapper.last_personalization[0].gate_open
    assert torch.equal(out, llama.generate(**encode(["cats rain sun"]), **GREEDY))


def test_explicit_history_skips_retrieval(wrapper, memory):
    batch = encode(["cats rain sun"])
    wrapper.generate(**batch, personalization=Personalization(history=["dogs vote", "w1 w2"]), **GREEDY)
    assert memory.calls == []
    text = make_tokenizer().decode(wrapper.last_personalization[0].history_ids)
    assert "dogs vote" in text and text.endswith("cats rain sun")


# ------------------------------------------------------------------------------------------------ adapters
def add_user_adapters(base):
    """Two random (non-zero) LoRA adapters named after users."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="alice")
    torch.manual_seed(1)
    model.add_adapter(
        "bob", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model.eval()


@pytest.fixture
def peft_llama():
    return add_user_adapters(make_model("llama"))


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_mixed_batch_of_user_adapters_equals_each_alone(peft_llama, memory, mode):
    wrapper = SpringForCausalLM(peft_llama, memory=memory, config=SpringConfig(mode=mode), tokenizer=make_tokenizer())
    texts, users = ["cats rain sun", "dogs vote", "w1 w2 w3"], ["alice", "bob", "carol"]
    batch = encode(texts)
    together = wrapper.generate(**batch, personalization=users, **GREEDY)[:, batch["input_ids"].shape[1] :]
    assert [info.adapter for info in wrapper.last_personalization] == ["alice", "bob", "__base__"]
    for row, (text, user) in enumerate(zip(texts, users, strict=True)):
        single = encode([text])
        alone = wrapper.generate(**single, personalization=user, **GREEDY)[:, single["input_ids"].shape[1] :]
        assert together[row].tolist() == alone[0].tolist()


def test_user_adapter_is_active_on_both_paths(peft_llama, memory):
    config = SpringConfig(interpolation_weight=0.5)
    wrapper = SpringForCausalLM(peft_llama, memory=memory, config=config, tokenizer=make_tokenizer())
    batch = encode(["cats rain sun"])
    out = wrapper.generate(**batch, personalization="bob", **GREEDY)
    history_ids = torch.tensor([wrapper.last_personalization[0].history_ids])
    peft_llama.set_adapter("bob")
    processor = RetrievalInterpolationLogitsProcessor(peft_llama, history_ids, None, 0.5)
    expected = peft_llama.generate(**batch, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    assert torch.equal(out, expected)
    # Gate closed for an unknown user: the base model, adapters off.
    closed = wrapper.generate(**batch, personalization=Personalization("carol", history=[]), **GREEDY)
    with peft_llama.disable_adapter():
        assert torch.equal(closed, peft_llama.generate(**batch, **GREEDY))
    # No personalization: the model exactly as it is (active adapter "bob").
    assert torch.equal(wrapper.generate(**batch, **GREEDY), peft_llama.generate(**batch, **GREEDY))


# ------------------------------------------------------------------------------------------------ persistence
def test_save_and_load_with_adapters_and_memory(tmp_path, tokenizer):
    pytest.importorskip("hnswlib")
    from transformers_spring.memory import HashingEncoder, LoGoMemory

    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = add_user_adapters(AutoModelForCausalLM.from_pretrained(base_dir))

    memory = LoGoMemory(HashingEncoder(64), gate=None, num_threads=1, use_global=False)
    memory.add_many([Interaction("alice", "cats rain", "cats w1", timestamp=1e9)])
    config = SpringConfig(interpolation_weight=0.4, use_global=False)
    wrapper = SpringForCausalLM(model, memory=memory, config=config, tokenizer=tokenizer)
    batch = encode(["cats rain sun"])
    expected = wrapper.generate(**batch, personalization="alice", **GREEDY)

    out_dir = tmp_path / "spring"
    (out_dir / "adapters").mkdir(parents=True)
    (out_dir / "notes.md").write_text("mine")  # the user's files survive every save
    (out_dir / "adapters" / "old-experiment.txt").write_text("mine too")
    wrapper.save_pretrained(out_dir)
    wrapper.save_pretrained(out_dir)
    assert (out_dir / "notes.md").read_text() == "mine"
    assert (out_dir / "adapters" / "old-experiment.txt").read_text() == "mine too"
    assert (out_dir / "spring_config.json").is_file()
    assert (out_dir / "adapters" / "alice" / "adapter_config.json").is_file()
    assert (out_dir / "adapters" / "bob" / "adapter_config.json").is_file()
    assert (out_dir / "memory").is_dir()
    assert "library_name: transformers_spring" in (out_dir / "README.md").read_text()
    saved = json.loads((out_dir / "spring_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir) and saved["interpolation_weight"] == 0.4

    loaded = SpringForCausalLM.from_pretrained(out_dir, memory_kwargs={"encoder": HashingEncoder(64)})
    assert loaded.spring_config == SpringConfig(**{**config.to_dict(), "base_model_name_or_path": str(base_dir)})
    assert sorted(loaded.base_model.peft_config) == ["alice", "bob"]
    assert len(loaded.memory) == 1
    assert torch.equal(loaded.generate(**batch, personalization="alice", **GREEDY), expected)


def test_from_pretrained_reads_a_hub_repo_from_the_cache(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = add_user_adapters(AutoModelForCausalLM.from_pretrained(base_dir))
    wrapper = SpringForCausalLM(model, config=SpringConfig(top_k=3), tokenizer=tokenizer)
    # The repo "me/spring" as a download leaves it in a Hub cache: read offline from `cache_dir`.
    commit, repo = "a" * 40, tmp_path / "hub" / "models--me--spring"
    wrapper.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = SpringForCausalLM.from_pretrained("me/spring", cache_dir=tmp_path / "hub", local_files_only=True)
    assert sorted(loaded.base_model.peft_config) == ["alice", "bob"] and loaded.spring_config.top_k == 3
    assert loaded.tokenizer is not None
    batch = encode(["cats rain sun"])
    bob = Personalization("bob", weight=0.0)  # bob's adapter alone (no memory)
    expected = wrapper.generate(**batch, personalization=bob, **GREEDY)
    assert not torch.equal(expected, wrapper.generate(**batch, **GREEDY))
    assert torch.equal(loaded.generate(**batch, personalization=bob, **GREEDY), expected)
    with pytest.raises(OSError):  # not in the cache, and no download allowed
        SpringForCausalLM.from_pretrained("me/other", cache_dir=tmp_path / "hub", local_files_only=True)


def test_from_pretrained_names_a_missing_folder_or_base_model(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"^'typo-dir', a SpringForCausalLM folder or a causal LM is no local fo"
    ):
        SpringForCausalLM.from_pretrained("typo-dir", local_files_only=True)
    # A state moved to another machine: the base model path it names is gone.
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    SpringForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer=tokenizer).save_pretrained("state")
    shutil.rmtree(base_dir)
    with pytest.raises(FileNotFoundError, match=r"the base model .*base' that spring_config.json in .*state' names "
                       r"is no local folder.*Pass `base_model_name_or_path=`"):  # fmt: skip
        SpringForCausalLM.from_pretrained("state", local_files_only=True)


def test_from_pretrained_wraps_a_plain_model(tmp_path, llama, tokenizer):
    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    wrapper = SpringForCausalLM.from_pretrained(tmp_path, spring_config=SpringConfig(top_k=3))
    assert wrapper.spring_config.top_k == 3 and wrapper.spring_config.base_model_name_or_path == str(tmp_path)
    assert wrapper.tokenizer is not None and wrapper.memory is None
    batch = encode(["cats rain sun"])
    assert torch.equal(wrapper.generate(**batch, **GREEDY), llama.generate(**batch, **GREEDY))


@contextlib.contextmanager
def fake_hub():
    """`HfApi.create_repo` / `upload_folder` mocked: yields what was uploaded (`calls`: one dict per upload, with the
    uploaded file list), and `create`, the create_repo mock."""
    from huggingface_hub import HfApi

    seen = {"calls": []}

    def fake_upload(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(f.relative_to(folder_path)) for f in Path(folder_path).rglob("*") if f.is_file())
        seen["calls"].append({"repo_id": repo_id, "files": files, **kwargs})
        return "commit"

    seen["create"] = mock.MagicMock(side_effect=lambda repo_id, **kwargs: mock.Mock(repo_id=repo_id))
    with (
        mock.patch.object(HfApi, "create_repo", seen["create"]),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake_upload),
    ):
        yield seen


def test_push_to_hub_uploads_the_saved_folder(wrapper):
    wrapper.memory = None
    with fake_hub() as hub:
        assert wrapper.push_to_hub("me/spring-test") == "commit"
    (call,) = hub["calls"]
    assert hub["create"].call_args.kwargs["private"] is True and call["repo_id"] == "me/spring-test"
    assert {"spring_config.json", "README.md", "tokenizer_config.json"} <= set(call["files"])
    assert call["delete_patterns"] == ["adapters/**", "memory/**"]  # forgotten users leave the repo


def test_save_pretrained_pushes_what_it_saved(tmp_path, wrapper):
    wrapper.memory = None
    with fake_hub() as hub:
        assert wrapper.save_pretrained(tmp_path / "my-spring", save_tokenizer=False) is None
        assert hub["calls"] == []
        out = wrapper.save_pretrained(
            tmp_path / "my-spring", save_tokenizer=False, push_to_hub=True, private=False, commit_message="v2"
        )
        wrapper.save_pretrained(tmp_path / "my-spring", push_to_hub=True, repo_id="me/other")
        with pytest.raises(TypeError, match="privat"):  # a typo is refused before anything is written
            wrapper.save_pretrained(tmp_path / "never", push_to_hub=True, privat=False)
    assert out == "commit" and not (tmp_path / "never").exists()
    (first, second) = hub["calls"]
    assert first["repo_id"] == "my-spring" and first["commit_message"] == "v2"
    assert hub["create"].call_args_list[0].kwargs["private"] is False
    assert "spring_config.json" in first["files"] and "tokenizer_config.json" not in first["files"]
    assert second["repo_id"] == "me/other" and "tokenizer_config.json" in second["files"]
    assert second["commit_message"] == "Upload SpringForCausalLM"


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_finished_rows_are_padded_and_leave_the_history_path(llama, memory, mode):
    wrapper = SpringForCausalLM(llama, memory=memory, config=SpringConfig(mode=mode), tokenizer=make_tokenizer())
    batch = encode(["cats rain sun", "dogs vote"])
    plain = wrapper.generate(**batch, personalization="alice", max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    eos = int(plain[0, batch["input_ids"].shape[1] + 2])  # row 0 emits this token at step 3
    out = wrapper.generate(
        **batch, personalization="alice", max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=eos
    )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    stats = wrapper.last_generation_stats
    for row in new:
        if eos in row:
            assert all(token == PAD for token in row[row.index(eos) + 1 :])
    finished_early = [row for row in new if eos in row[:-1]]
    assert finished_early, new
    assert stats["history_row_steps"] < 2 * stats["steps"]  # a finished row stopped its history path


# ------------------------------------------------------------------------------------------------ score (NLL)
def _slow_logprobs(model, prefix, continuation):
    """log p(continuation | prefix), one full forward per token (no cache, no batching)."""
    out, ids = [], list(prefix)
    for token in continuation:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        out.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return torch.tensor(out)


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_score_equals_a_slow_hand_computation(llama, memory, weight):
    """The mixture log(λ p_hist + (1 − λ) p_main) token by token, against full forwards per token; λ = 0 (a closed
    gate) is the parametric path alone, λ = 1 the history path alone."""
    wrapper = SpringForCausalLM(llama, memory=memory, tokenizer=make_tokenizer())
    batch = encode(["cats rain sun", "dogs vote"])
    continuations = [[9, 10, 11], [12, 13]]
    rows = [Personalization(user="alice", weight=weight), Personalization(user="bob", weight=weight)]
    got = wrapper.score(batch["input_ids"], continuations, batch["attention_mask"], personalization=rows)
    for row, info in enumerate(wrapper.last_personalization):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        main = _slow_logprobs(llama, prompt, continuations[row])
        if weight == 0.0:
            assert not info.gate_open
            expected = main
        else:
            assert info.gate_open and info.history_ids
            hist = _slow_logprobs(llama, info.history_ids, continuations[row])
            expected = torch.log(weight * hist.exp() + (1 - weight) * main.exp())
        assert torch.allclose(got[row], expected, atol=1e-5), (row, got[row], expected)


def test_score_with_closed_gate_and_without_personalization(llama, memory):
    wrapper = SpringForCausalLM(llama, memory=memory, tokenizer=make_tokenizer())
    batch = encode(["cats rain sun"])
    prompt = batch["input_ids"][0].tolist()
    plain = wrapper.score(batch["input_ids"], [[9, 10]])
    assert torch.allclose(plain[0], _slow_logprobs(llama, prompt, [9, 10]), atol=1e-5)
    closed = wrapper.score(batch["input_ids"], [[9, 10]], personalization=Personalization(user="alice", gate=1e9))
    assert not wrapper.last_personalization[0].gate_open
    assert torch.allclose(closed[0], plain[0])
    with pytest.raises(ValueError, match="continuations"):
        wrapper.score(batch["input_ids"], [[9], [10]])
    with pytest.raises(ValueError, match="at least one token"):
        wrapper.score(batch["input_ids"], [[]])


def test_forget_user_removes_their_adapter_and_memory_from_the_next_save(tmp_path, tokenizer):
    pytest.importorskip("hnswlib")
    from testing_utils import find_traces

    from transformers_spring.memory import HashingEncoder, LoGoMemory

    model = add_user_adapters(make_model("llama"))  # adapters "alice" and "bob"
    memory = LoGoMemory(HashingEncoder(64), gate=None, num_threads=1, use_global=False)
    memory.add_many([Interaction("alice", "cats zqsecret", "zqreply", timestamp=1e9),
                     Interaction("bob", "rain", "sun", timestamp=1e9)])  # fmt: skip
    wrapper = SpringForCausalLM(model, memory=memory, tokenizer=tokenizer)
    out = tmp_path / "spring"
    wrapper.save_pretrained(out)
    assert (out / "adapters" / "alice").is_dir()
    assert wrapper.forget_user("alice") and not wrapper.forget_user("alice")
    assert sorted(wrapper.base_model.peft_config) == ["bob"]
    wrapper.save_pretrained(out)
    assert find_traces(out, "alice", "zqsecret", "zqreply") == []


def test_the_manifest_lists_components_and_a_memory_subclass_survives(tmp_path, tokenizer):
    pytest.importorskip("hnswlib")
    from transformers_spring.memory import HashingEncoder, LoGoMemory
    from transformers_spring.persistence import read_manifest

    class TaggedMemory(LoGoMemory):
        pass

    memory = TaggedMemory(HashingEncoder(64), gate=None, num_threads=1, use_global=False)
    memory.add(Interaction("alice", "cats rain", "cats w1", timestamp=1e9))
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = add_user_adapters(AutoModelForCausalLM.from_pretrained(base_dir))
    out = tmp_path / "spring"
    SpringForCausalLM(model, memory=memory, tokenizer=tokenizer).save_pretrained(out)
    manifest = read_manifest(out)
    assert manifest["type"] == "SpringForCausalLM"
    parts = {c["name"]: c for c in manifest["components"]}
    assert set(parts) == {"config", "adapters", "memory", "tokenizer"}
    assert parts["memory"]["path"] == "memory" and parts["memory"]["type"].endswith("TaggedMemory")
    loaded = SpringForCausalLM.from_pretrained(out, memory_kwargs={"encoder": HashingEncoder(64)})
    assert type(loaded.memory) is TaggedMemory and len(loaded.memory) == 1


def test_a_symlinked_adapter_folder_is_refused(tmp_path, tokenizer):
    pytest.importorskip("hnswlib")
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = add_user_adapters(AutoModelForCausalLM.from_pretrained(base_dir))
    out = tmp_path / "spring"
    SpringForCausalLM(model, tokenizer=tokenizer).save_pretrained(out)
    elsewhere = tmp_path / "elsewhere"
    (out / "adapters" / "bob").rename(elsewhere)
    (out / "adapters" / "bob").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="symlink"):
        SpringForCausalLM.from_pretrained(out)


def test_forgetting_the_only_adapter_keeps_it_out_of_the_next_save(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model
    from testing_utils import find_traces

    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="zq-solo")
    wrapper = SpringForCausalLM(model, tokenizer=tokenizer)
    assert wrapper.forget_user("zq-solo")
    out = tmp_path / "spring"
    wrapper.save_pretrained(out)
    assert find_traces(out, "zq-solo") == [] and not (out / "adapters").exists()


def test_score_batches_rows_of_other_adapters_and_lengths_alike(llama, memory, monkeypatch):
    """Right-padded batches of mixed lengths and adapters give each row what a forward of its own would."""
    wrapper = SpringForCausalLM(llama, memory=memory, tokenizer=make_tokenizer())
    batch = encode(["cats rain sun", "dogs vote", "cats"])
    continuations = [[9, 10, 11], [12], [13, 14]]
    rows = [Personalization(user="alice", weight=0.4), Personalization(user="bob", weight=0.0),
            Personalization(user="alice", weight=1.0)]  # fmt: skip
    together = wrapper.score(batch["input_ids"], continuations, batch["attention_mask"], personalization=rows)
    from transformers_spring.generation import scoring

    original = scoring.path_logprobs
    monkeypatch.setattr(scoring, "path_logprobs", lambda *a, **k: original(*a, **{**k, "max_tokens": 1}))
    alone = wrapper.score(batch["input_ids"], continuations, batch["attention_mask"], personalization=rows)
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------ right padding
def right_padded(texts):
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "right"  # SmolLM2's tokenizer default
    return encode(texts, tokenizer)


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_a_right_padded_batch_decodes_as_its_left_padded_twin(mode, caplog):
    from testing_utils import make_adapted_model
    from transformers.utils import logging as hf_logging

    memory = FakeMemory({"alice": [("cats rain", "cats headline w1 w2")], "bob": [("dogs", "w6 w7 dogs")]})
    wrapper = SpringForCausalLM(
        make_adapted_model(), memory=memory, config=SpringConfig(mode=mode), tokenizer=make_tokenizer()
    )  # adapter "alice"; bob decodes with the base model
    texts, users = ["cats rain sun headline", "dogs vote"], ["alice", "bob"]
    left, right = encode(texts), right_padded(texts)
    width = left["input_ids"].shape[1]
    assert right["attention_mask"][1].tolist() == [1, 1, 0, 0]
    expected = wrapper.generate(**left, personalization=users, **GREEDY)
    hf_logging.enable_propagation()
    try:
        for _ in range(2):
            out = wrapper.generate(**right, personalization=users, **GREEDY)
            assert out[:, width:].tolist() == expected[:, width:].tolist()  # the continuations
            assert torch.equal(out, expected)  # and the prompts, now left-padded
    finally:
        hf_logging.disable_propagation()
    warnings = [r.getMessage() for r in caplog.records if "right-padded" in r.getMessage()]
    assert len(warnings) == 1 and 'padding_side = "left"' in warnings[0]  # once per wrapper
    # The closed-gate path (plain generate with the users' adapters) is re-padded too.
    closed = [Personalization("alice", history=[]), Personalization("bob", history=[])]
    assert torch.equal(
        wrapper.generate(**right, personalization=closed, **GREEDY),
        wrapper.generate(**left, personalization=closed, **GREEDY),
    )


def test_score_takes_right_padded_prompts_and_the_logits_processor_refuses_them(llama, memory):
    wrapper = SpringForCausalLM(llama, memory=memory, tokenizer=make_tokenizer())
    texts, continuations = ["cats rain sun headline", "dogs vote"], [[9, 10], [11]]
    left, right = encode(texts), right_padded(texts)
    scores = [
        wrapper.score(batch["input_ids"], continuations, batch["attention_mask"], personalization="alice")
        for batch in (left, right)
    ]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*scores, strict=True))
    with pytest.raises(ValueError, match=r"`attention_mask` is right-padded.*padding_side = \"left\""):
        wrapper.logits_processor(right["input_ids"], right["attention_mask"], "alice")
    wrapper.logits_processor(left["input_ids"], left["attention_mask"], "alice")
