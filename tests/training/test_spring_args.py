import pytest
from training_testing import make_model
from transformers import HfArgumentParser

from transformers_spring.training import (
    SpringTrainingArguments,
    adapter_name_for,
    build_lora_config,
    find_lora_target_modules,
)


def test_paper_defaults(tmp_path):
    args = SpringTrainingArguments(output_dir=str(tmp_path))
    assert (args.selection_ratio, args.drift_alpha, args.score_reduction, args.buffer_size) == (0.3, 1.0, "mean", 50)
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules) == (8, 8, 0.05, None)
    assert (args.max_length, args.response_only_loss) == (768, True)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (1e-4, 0.01, 0.1)
    assert (args.num_train_epochs, args.per_device_train_batch_size) == (2.0, 4)
    assert args.report_to in ("none", [], ["none"])
    assert args.remove_unused_columns is False


def test_every_spring_field_has_help():
    from dataclasses import fields

    from transformers_spring.training.spring_config import SPRING_FIELDS

    by_name = {f.name: f for f in fields(SpringTrainingArguments)}
    for name in SPRING_FIELDS:
        assert by_name[name].metadata.get("help"), name


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("selection_ratio", 0.0, ValueError),
        ("selection_ratio", 1.5, ValueError),
        ("selection_ratio", "0.3", TypeError),
        ("drift_alpha", -1.0, ValueError),
        ("drift_alpha", float("inf"), ValueError),
        ("score_reduction", "max", ValueError),
        ("buffer_size", -1, ValueError),
        ("buffer_size", 2.5, TypeError),
        ("rescore_buffer", "sometimes", ValueError),
        ("lora_r", 0, ValueError),
        ("lora_alpha", 0, ValueError),
        ("lora_dropout", 1.0, ValueError),
        ("lora_target_modules", [], ValueError),
        ("max_length", 1, ValueError),
        ("prompt_template", "no placeholder", ValueError),
        ("prompt_template", "{prompt} {other}", ValueError),
        ("scoring_batch_size", 0, ValueError),
        ("scoring_dtype", "float8", ValueError),
    ],
)
def test_invalid_values_name_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=f"`{field}`"):
        SpringTrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(SpringTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--selection_ratio", "0.5", "--score_reduction", "sum", "--lora_target_modules",
         "q_proj", "k_proj", "--num_train_epochs", "1", "--warmup_steps", "0", "--scoring_dtype", "bfloat16",
         "--scoring_shared_prefix", "false"]
    )  # fmt: skip
    assert args.selection_ratio == 0.5 and args.score_reduction == "sum"
    assert args.scoring_dtype == "bfloat16" and args.scoring_shared_prefix is False
    assert args.lora_target_modules == ["q_proj", "k_proj"]
    assert args.num_train_epochs == 1 and args.warmup_steps == 0


@pytest.mark.parametrize(
    "arch, expected",
    [("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
     ("gpt_neox", ["query_key_value"])],
)  # fmt: skip
def test_target_detection_per_architecture(arch, expected, tmp_path):
    model = make_model(arch)
    assert find_lora_target_modules(model) == expected
    config = build_lora_config(SpringTrainingArguments(output_dir=str(tmp_path)), model)
    assert sorted(config.target_modules) == sorted(expected)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.05, "none")


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


def test_warmup_ratio_rounds_down(tmp_path):
    args = SpringTrainingArguments(output_dir=str(tmp_path))
    assert [args.get_warmup_steps(n) for n in (1, 2, 9, 10, 25, 100)] == [0, 0, 0, 1, 2, 10]
    assert SpringTrainingArguments(output_dir=str(tmp_path), warmup_steps=3).get_warmup_steps(100) == 3


def test_help_renders():
    # argparse formats help strings with %: a stray "%" in a field's help breaks `--help`
    assert "--selection_ratio" in HfArgumentParser(SpringTrainingArguments).format_help()
