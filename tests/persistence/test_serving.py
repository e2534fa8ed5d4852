import json

import pytest
import torch
from safetensors.torch import save_file
from testing_utils import TRAINING_VOCAB, make_args, make_buffer_memory, make_interactions, make_model, make_tokenizer

from transformers_spring.persistence.serving import (
    VLLM_LORA_RANKS,
    check_max_lora_rank,
    check_vllm_lora,
    read_serving_manifest,
    vllm_lora_problems,
)

GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def adapter(tmp_path, keys=("base_model.model.layers.0.q_proj.lora_A.weight",), **changes):
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {**GOOD, **changes}
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    save_file({key: torch.zeros(2, 2) for key in keys}, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_plain_lora_folder_passes(tmp_path):
    folder = adapter(tmp_path)
    assert vllm_lora_problems(folder) == []
    check_vllm_lora(folder)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"r": 32}, "'r'"),
        ({"bias": "all"}, "'bias'"),
        ({"modules_to_save": ["lm_head"]}, "'modules_to_save'"),
        ({"use_dora": True}, "'use_dora'"),
        ({"rank_pattern": {"q_proj": 32}}, "'rank_pattern'"),
        ({"lora_bias": True}, "'lora_bias'"),
        ({"layer_replication": [[0, 1]]}, "'layer_replication'"),
        ({"init_lora_weights": "pissa"}, "'init_lora_weights'"),
        ({"peft_type": "IA3"}, "'peft_type'"),
        ({"target_modules": ...}, "'target_modules'"),
        ({"lora_alpha": ...}, "'lora_alpha'"),
    ],
)
def test_each_vllm_rule_names_its_field(tmp_path, changes, field):
    folder = adapter(tmp_path, **changes)
    problems = vllm_lora_problems(folder, max_lora_rank=16)
    assert len(problems) == 1 and field in problems[0] and "adapter_config.json" in problems[0]
    with pytest.raises(ValueError, match=field):
        check_vllm_lora(folder, max_lora_rank=16)


def test_what_vllm_serves_passes(tmp_path):
    folder = adapter(tmp_path, rank_pattern={"q_proj": 16}, use_rslora=True, init_lora_weights="gaussian")
    assert vllm_lora_problems(folder, max_lora_rank=16) == []


def test_rank_is_checked_against_the_servers_max(tmp_path):
    folder = adapter(tmp_path, r=32)
    assert vllm_lora_problems(folder, max_lora_rank=32) == []
    assert "max_lora_rank 16" in vllm_lora_problems(folder, max_lora_rank=16)[0]


def test_weights_other_than_lora_are_refused(tmp_path):
    folder = adapter(
        tmp_path, keys=("base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.lm_head.weight")
    )
    assert "lm_head" in vllm_lora_problems(folder)[0]


def test_missing_and_hostile_files(tmp_path):
    assert "missing" in vllm_lora_problems(tmp_path / "nowhere")[0]
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in vllm_lora_problems(folder)[0]
    (folder / "adapter_config.json").write_text("[1, 2]")
    assert "JSON object" in vllm_lora_problems(folder)[0]
    (folder / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in vllm_lora_problems(folder)[0]


@pytest.mark.parametrize(
    "bad, error",
    [(0, ValueError), (17, ValueError), (8.0, TypeError), (True, TypeError), ("16", TypeError), (None, TypeError)],
)
def test_max_lora_rank_must_be_a_vllm_value(bad, error):
    with pytest.raises(error, match="max_lora_rank"):
        check_max_lora_rank(bad)
    assert all(check_max_lora_rank(r) == r for r in VLLM_LORA_RANKS)


def test_manifest_paths_cannot_leave_the_folder(tmp_path):
    (tmp_path / "serving_manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "adapters": [{"path": "../elsewhere", "lora_int_id": 1, "lora_name": "a", "user_id": "a"}],
            }
        )
    )
    with pytest.raises(ValueError, match=r"adapters\[0\]\.path"):
        read_serving_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="serving_manifest.json"):
        read_serving_manifest(tmp_path / "empty")


# ------------------------------------------------------------------------------------- manifest cross-checks (issue 26)
def _export(tmp_path, users):
    """An export folder of `users` (one plain adapter each) with a manifest as `export_for_serving` writes it."""
    import hashlib

    root = tmp_path / "serve"
    root.mkdir()
    entries = []
    for i, user in enumerate(users, start=1):
        folder = adapter(root / "..", keys=(f"base_model.model.layers.{i}.q_proj.lora_A.weight",))
        folder.rename(root / user)
        digest = hashlib.sha256((root / user / "adapter_model.safetensors").read_bytes()).hexdigest()
        entries.append(
            {"user_id": user, "lora_name": user, "lora_int_id": i, "path": user, "rank": 8, "sha256": digest}
        )
    manifest = {"format_version": 1, "max_lora_rank": 16, "adapters": entries, "retired_lora_int_ids": []}
    (root / "serving_manifest.json").write_text(json.dumps(manifest))
    return root, manifest


def test_two_users_on_one_folder_are_refused(tmp_path):
    root, manifest = _export(tmp_path, ["alice", "bob"])
    assert [a["path"] for a in read_serving_manifest(root)["adapters"]] == [str(root / "alice"), str(root / "bob")]
    manifest["adapters"][1].update(path="./alice", sha256=manifest["adapters"][0]["sha256"])
    (root / "serving_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"adapters\[1\]\.path.*is the folder of user 'alice' too"):
        read_serving_manifest(root)


def test_tampered_weights_are_refused(tmp_path):
    root, _ = _export(tmp_path, ["alice", "bob"])
    save_file(
        {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 2)},
        str(root / "bob" / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"adapters\[1\]\.sha256' does not match .*user 'bob'"):
        read_serving_manifest(root)
    read_serving_manifest(root, verify_weights=False)  # the structure alone is fine


def test_an_oversized_manifest_is_refused_before_parsing(tmp_path):
    from transformers_spring.persistence.json_files import MAX_SERVING_MANIFEST_BYTES

    with open(tmp_path / "serving_manifest.json", "wb") as handle:
        handle.truncate(MAX_SERVING_MANIFEST_BYTES + 1)
    with pytest.raises(ValueError, match=rf"is {MAX_SERVING_MANIFEST_BYTES + 1} bytes, above the limit"):
        read_serving_manifest(tmp_path)


def test_an_export_refuses_two_users_on_one_adapter_name(tmp_path):
    from transformers_spring.persistence.serving_export import export_adapters_for_serving

    source = adapter(tmp_path)
    with pytest.raises(ValueError, match=r"users 'a\.b' and 'a_b' map to the same adapter name 'a_b'"):
        export_adapters_for_serving(
            tmp_path / "serve", torch.nn.Linear(2, 2), {"a.b": "a_b", "a_b": "a_b"}, lambda name: source,
            max_lora_rank=16,
        )  # fmt: skip
    assert not (tmp_path / "serve" / "serving_manifest.json").exists()


def test_lora_int_ids_are_never_reused_after_the_manifest_is_lost(tmp_path):
    from transformers_spring.training import ContinualPersonalizer

    p = ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3, num_train_epochs=1), make_buffer_memory(),
    )  # fmt: skip
    p.observe("alice", make_interactions("alice", 4))
    first = p.export_for_serving(tmp_path / "serve")["adapters"][0]
    assert first["lora_int_id"] == 1
    p.observe("alice", make_interactions("alice", 4, start=100))  # new weights
    (tmp_path / "serve" / "serving_manifest.json").unlink()  # the manifest is lost
    second = p.export_for_serving(tmp_path / "serve")["adapters"][0]
    assert second["sha256"] != first["sha256"] and second["lora_int_id"] == 2  # never the old id
    assert read_serving_manifest(tmp_path / "serve")["retired_lora_int_ids"] == [1]
