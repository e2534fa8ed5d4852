"""`SpringTrainingArguments`: the paper's defaults, validation naming the field, argument parsing, warmup."""

import warnings

import pytest
import torch
from transformers import HfArgumentParser

from transformers_spring.training import SpringTrainingArguments


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


def test_warmup_ratio_rounds_down(tmp_path):
    args = SpringTrainingArguments(output_dir=str(tmp_path))
    assert [args.get_warmup_steps(n) for n in (1, 2, 9, 10, 25, 100)] == [0, 0, 0, 1, 2, 10]
    assert SpringTrainingArguments(output_dir=str(tmp_path), warmup_steps=3).get_warmup_steps(100) == 3


def test_pin_memory_follows_the_accelerator_unless_set(tmp_path, monkeypatch):
    # Without an accelerator, pinned memory is never used and torch's DataLoader warns about it at every trainer run.
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    args = SpringTrainingArguments(output_dir=str(tmp_path))
    assert args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(torch.utils.data.DataLoader([torch.zeros(2)], pin_memory=args.dataloader_pin_memory))  # as Trainer does
    assert [str(w.message) for w in caught if "pin_memory" in str(w.message)] == []
    # The caller's choice stands, either way, and so does an accelerator's default.
    assert SpringTrainingArguments(output_dir=str(tmp_path), dataloader_pin_memory=True).dataloader_pin_memory
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert SpringTrainingArguments(output_dir=str(tmp_path)).dataloader_pin_memory is True
    assert not SpringTrainingArguments(output_dir=str(tmp_path), dataloader_pin_memory=False).dataloader_pin_memory
    parser = HfArgumentParser(SpringTrainingArguments)
    for argv, want in [([], True), (["--dataloader_pin_memory"], True), (["--dataloader_pin_memory", "false"], False)]:
        (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])
        assert parsed.dataloader_pin_memory is want, argv


def test_help_renders():
    # argparse formats help strings with %: a stray "%" in a field's help breaks `--help`
    assert "--selection_ratio" in HfArgumentParser(SpringTrainingArguments).format_help()
