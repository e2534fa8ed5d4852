import json

import pytest
import torch
from safetensors.torch import save_file

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
