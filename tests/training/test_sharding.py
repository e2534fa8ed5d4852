import json
import shutil

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_args, make_buffer_memory, make_interactions, make_model, make_tokenizer

from transformers_spring.memory import HashingEncoder
from transformers_spring.training import ContinualPersonalizer, UserShard, claim_user_shard, shard_of

USERS = ("alice", "bob", "carol", "dave", "erin")


def test_shard_of_is_a_stable_hash():
    # sha256("alice")[:8] as a big-endian int, mod 7: the same on every machine and Python
    import hashlib

    assert shard_of("alice", 7) == int.from_bytes(hashlib.sha256(b"alice").digest()[:8], "big") % 7
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[shard_of(f"user{i}", 4)] += 1
    assert min(counts) > 900  # about a quarter each
    assert shard_of("alice", 1) == 0


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError)]
)
def test_bad_shard_counts_are_refused(bad, error):
    with pytest.raises(error, match="num_shards"):
        shard_of("alice", bad)


def test_user_shard_is_validated_and_owns_its_users():
    shards = [UserShard(i, 3) for i in range(3)]
    for user in USERS:
        assert sum(s.owns(user) for s in shards) == 1
    with pytest.raises(ValueError, match="index"):
        UserShard(3, 3)
    with pytest.raises(TypeError, match="count"):
        UserShard(0, "2")


def test_claim_user_shard_reads_and_clears_the_launcher_environment():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "PATH": "/bin"}  # fmt: skip
    assert claim_user_shard(env) == UserShard(1, 2)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1"}  # worker 1 gets the second GPU
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,6"}
    assert claim_user_shard(env) == UserShard(1, 2) and env == {"CUDA_VISIBLE_DEVICES": "6"}
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}  # no GPU stays no GPU
    assert claim_user_shard(env) == UserShard(0, 2) and env == {"CUDA_VISIBLE_DEVICES": ""}
    assert claim_user_shard({}) == UserShard(0, 1)
    with pytest.raises(ValueError, match="RANK"):
        claim_user_shard({"RANK": "x"})


def _named_model(name="tiny/llama"):
    """A tiny model with a name, as `from_pretrained` gives one: a merge checks each shard's recorded base model."""
    model = make_model("llama", TRAINING_VOCAB.size)
    model.config.name_or_path = name
    return model


def _personalizer(tmp_path, shard=None, model=None):
    return ContinualPersonalizer(
        model if model is not None else _named_model(), make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3), make_buffer_memory(), max_resident_adapters=2, shard=shard,
    )  # fmt: skip


def test_shards_train_disjoint_users_and_merge_into_the_single_process_state(tmp_path):
    single = _personalizer(tmp_path / "one")
    shards = [_personalizer(tmp_path / f"s{i}", UserShard(i, 2)) for i in range(2)]
    for period in range(2):
        for user in USERS:
            single.observe(user, make_interactions(user, 6, start=100 * period))
            outputs = [p.observe(user, make_interactions(user, 6, start=100 * period)) for p in shards]
            assert sorted(o.skipped for o in outputs) == [False, True]  # exactly one shard trains each user
    for i, shard in enumerate(shards):
        shard.save_pretrained(tmp_path / f"shard{i}")
    merged = ContinualPersonalizer.merge_shards(
        [tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged", _named_model(),
        memory_kwargs={"encoder": HashingEncoder(32)},
    )  # fmt: skip
    assert sorted(merged.users) == sorted(USERS)
    for user in USERS:
        assert merged.period(user) == 2
        a, b = single.state_dict(user), merged.state_dict(user)
        assert all(torch.equal(a[k], b[k]) for k in a), user
        assert [i.id for i in merged.memory.buffer(user)] == [i.id for i in single.memory.buffer(user)]
        assert merged.memory.buffer_scores(user) == single.memory.buffer_scores(user)
        assert [r.id for r in merged.memory.history(user)] == [r.id for r in single.memory.history(user)]
    assert sorted(merged.score_cache.keys()) == sorted(single.score_cache.keys())
    assert all(merged.score_cache.get(k) == single.score_cache.get(k) for k in single.score_cache.keys())
    assert (tmp_path / "merged" / "adapters" / "erin" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"\(index, count\)"):  # a missing worker's folder
        ContinualPersonalizer.merge_shards(
            [tmp_path / "shard0"], tmp_path / "partial", _named_model(),
            memory_kwargs={"encoder": HashingEncoder(32)},
        )  # fmt: skip


def test_merge_refuses_overlapping_shards(tmp_path):
    a, b = _personalizer(tmp_path / "a"), _personalizer(tmp_path / "b")
    a.observe("alice", make_interactions("alice", 4))
    b.observe("alice", make_interactions("alice", 4))
    a.save_pretrained(tmp_path / "sa")
    b.save_pretrained(tmp_path / "sb")
    with pytest.raises(ValueError, match="'alice' is in"):
        ContinualPersonalizer.merge_shards(
            [tmp_path / "sa", tmp_path / "sb"], tmp_path / "m", _named_model(),
            memory_kwargs={"encoder": HashingEncoder(32)},
        )  # fmt: skip
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------- red team (issue 26)
@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """Two saved shards trained alike: 'a.b' in one, 'carol' in the other, plus an unnamed-model shard of 'dave'."""
    root = tmp_path_factory.mktemp("shards")
    for folder, user, model in (
        ("sa", "a.b", None),
        ("sb", "carol", None),
        ("unnamed", "dave", make_model("llama", TRAINING_VOCAB.size)),
    ):
        p = _personalizer(root / f"work-{folder}", model=model)
        p.observe(user, make_interactions(user, 4, prefix=user.replace(".", "")))
        p.save_pretrained(root / folder)
    return root


def _merge(folders, target):
    return ContinualPersonalizer.merge_shards(
        folders, target, _named_model(), memory_kwargs={"encoder": HashingEncoder(32)}
    )


def _copy(two_shards, tmp_path, name):
    return shutil.copytree(two_shards / name, tmp_path / name)


def test_merge_refuses_a_shard_without_a_base_model(two_shards, tmp_path):
    with pytest.raises(ValueError, match=r"shard 1 \(.*unnamed\) does not record its base model"):
        _merge([two_shards / "sa", two_shards / "unnamed"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_users_on_one_adapter_name_across_shards(two_shards, tmp_path):
    p = _personalizer(tmp_path / "work")
    p.observe("a_b", make_interactions("a_b", 4, prefix="a_b"))
    p.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"users 'a\.b' and 'a_b' map to the same adapter name 'a_b'"):
        _merge([two_shards / "sa", tmp_path / "other"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("lora_alpha", 99, r"shard 1 .* differ in the LoRA config field 'lora_alpha'"),
        ("use_rslora", True, r"shard 1 .* differ in the LoRA config field 'use_rslora'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),  # may be refused earlier, by the adapter's load check
    ],
)
def test_merge_refuses_other_lora_configs(two_shards, tmp_path, field, value, error):
    folder = _copy(two_shards, tmp_path, "sb")
    config_path = folder / "adapters" / "carol" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=error):
        _merge([two_shards / "sa", folder], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_other_recorded_spring_args(two_shards, tmp_path):
    folder = _copy(two_shards, tmp_path, "sb")
    state = json.loads((folder / "continual_state.json").read_text())
    state["spring_args"]["selection_ratio"] = 0.9
    (folder / "continual_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"shard 1 .* differ in the recorded `spring_args` field 'selection_ratio'"):
        _merge([two_shards / "sa", folder], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    merged = _merge([two_shards / "sa", two_shards / "sb"], tmp_path / "ok")  # alike: merged
    assert sorted(merged.users) == ["a.b", "carol"]
