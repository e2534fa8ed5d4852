"""Per-user LoRA adapters: target detection per architecture, the LoRA config, adapter names and seeds, creation
under a private RNG, weight snapshots."""

import pytest
import torch
from peft import LoraConfig
from testing_utils import LORA_TARGETS, TRAINING_VOCAB, make_model

from transformers_spring.training import (
    SpringTrainingArguments,
    adapter_name_for,
    build_lora_config,
    find_lora_target_modules,
)
from transformers_spring.training.lora import (
    activate_adapter,
    adapter_names,
    adapter_seed,
    adapter_state,
    create_adapter,
    restore_adapter_state,
)


@pytest.mark.parametrize(
    "arch, expected",
    [("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
     ("gpt_neox", ["query_key_value"]), ("qwen3", ["q_proj", "v_proj"]), ("mistral", ["q_proj", "v_proj"]),
     ("gemma3", ["q_proj", "v_proj"]), ("phi3", ["qkv_proj"])],
)  # fmt: skip
def test_target_detection_per_architecture(arch, expected, tmp_path):
    model = make_model(arch)
    assert find_lora_target_modules(model) == expected
    assert expected == LORA_TARGETS.get(arch, ["q_proj", "v_proj"])  # what the test helpers adapt
    config = build_lora_config(SpringTrainingArguments(output_dir=str(tmp_path)), model)
    assert sorted(config.target_modules) == sorted(expected)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.05, "none")


def test_explicit_targets_win_over_detection(tmp_path):
    args = SpringTrainingArguments(output_dir=str(tmp_path), lora_target_modules=["k_proj"], lora_r=4)
    config = build_lora_config(args, make_model("llama"))
    assert sorted(config.target_modules) == ["k_proj"] and config.r == 4


def test_target_detection_error_names_the_field():
    import torch.nn as nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="lora_target_modules"):
        find_lora_target_modules(Odd())


def test_target_detection_restricts_to_language_model():
    import torch.nn as nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4)

    class Multimodal(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = Attn()
            self.language_model = Attn()

    targets = find_lora_target_modules(Multimodal())
    assert isinstance(targets, str) and "language_model" in targets


def test_adapter_name_matches_generation_routing():
    from transformers_spring.generation.adapters import sanitize_adapter_name

    assert adapter_name_for("Ron Dicker") == sanitize_adapter_name("Ron Dicker") == "Ron_Dicker"
    with pytest.raises(ValueError, match="user_id"):
        adapter_name_for("__base__")
    with pytest.raises(ValueError, match="reserved adapter name 'default'"):
        adapter_name_for("default")  # peft saves "default" in the folder's root: it could not be offloaded


def test_adapter_seed_is_stable_and_per_name():
    assert adapter_seed(0, "alice") == adapter_seed(0, "alice")
    assert len({adapter_seed(0, "alice"), adapter_seed(0, "bob"), adapter_seed(1, "alice")}) == 3
    assert all(0 <= adapter_seed(seed, "alice") < 2**31 for seed in range(5))


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")


def test_create_adapter_is_independent_of_order_and_leaves_the_rng_alone():
    first, other = make_model("llama", TRAINING_VOCAB.size), make_model("llama", TRAINING_VOCAB.size)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = create_adapter(first, "alice", lora_config(), seed=0)
    first = create_adapter(first, "bob", lora_config(), seed=0)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG did not move
    other = create_adapter(other, "bob", lora_config(), seed=0)
    other = create_adapter(other, "alice", lora_config(), seed=0)
    assert sorted(adapter_names(first)) == ["alice", "bob"] and adapter_names(make_model("llama")) == []
    for name in ("alice", "bob"):
        a, b = adapter_state(first, name), adapter_state(other, name)
        assert a.keys() == b.keys() and len(a) == 8  # A and B of q_proj and v_proj in 2 layers
        assert all(torch.equal(a[key], b[key]) for key in a)
    again = create_adapter(make_model("llama", TRAINING_VOCAB.size), "alice", lora_config(), seed=1)
    assert not all(torch.equal(adapter_state(first, "alice")[k], v) for k, v in adapter_state(again, "alice").items())


def test_adapter_state_round_trip_and_activation():
    model = create_adapter(make_model("llama", TRAINING_VOCAB.size), "alice", lora_config(), seed=0)
    model = create_adapter(model, "bob", lora_config(), seed=0)
    saved = adapter_state(model, "alice")
    assert all(".alice." in name for name in saved)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.add_(1.0)
    assert not torch.equal(adapter_state(model, "alice")[next(iter(saved))], saved[next(iter(saved))])
    restore_adapter_state(model, saved)
    assert all(torch.equal(adapter_state(model, "alice")[k], v) for k, v in saved.items())
    activate_adapter(model, "bob")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == set(adapter_state(model, "bob"))  # only bob's LoRA weights
    assert model.active_adapter == "bob" and model.peft_config["bob"].inference_mode is False
