"""`SpringTrainingArguments`: the measured defaults and the paper's preset, validation naming the field, argument
parsing, warmup."""

import dataclasses
import json
import warnings

import pytest
import torch
from transformers import HfArgumentParser

from transformers_spring.training import SpringTrainingArguments
from transformers_spring.training.spring_config import TRAINING_PRESETS, default_learning_rate


def test_defaults_follow_the_measured_preset(tmp_path):
    args = SpringTrainingArguments(output_dir=str(tmp_path))
    assert args.spring_preset == "measured"
    assert (args.learning_rate, args.selection_ratio, args.num_train_epochs) == ("auto", 1.0, 2.0)
    assert (args.drift_alpha, args.score_reduction, args.buffer_size) == (1.0, "mean", 50)
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules) == (8, 8, 0.05, None)
    assert (args.max_length, args.response_only_loss) == (768, True)
    assert (args.weight_decay, args.warmup_steps) == (0.01, 0.1)
    assert args.per_device_train_batch_size == 4
    assert args.report_to in ("none", [], ["none"])
    assert args.remove_unused_columns is False


def test_the_paper_preset_gives_the_papers_settings(tmp_path):
    paper = SpringTrainingArguments.from_preset("paper", output_dir=str(tmp_path))
    assert (paper.spring_preset, paper.learning_rate, paper.selection_ratio, paper.num_train_epochs) == (
        "paper", 1e-4, 0.3, 2.0,
    )  # fmt: skip
    assert SpringTrainingArguments(output_dir=str(tmp_path), spring_preset="paper").learning_rate == 1e-4
    measured = SpringTrainingArguments.from_preset("measured", output_dir=str(tmp_path), buffer_size=7)
    assert (measured.learning_rate, measured.selection_ratio, measured.buffer_size) == ("auto", 1.0, 7)
    assert set(TRAINING_PRESETS) == {"measured", "paper"}
    with pytest.raises(ValueError, match="`name`"):
        SpringTrainingArguments.from_preset("fast", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`spring_preset`"):
        SpringTrainingArguments(output_dir=str(tmp_path), spring_preset="fast")
    with pytest.raises(ValueError, match="`spring_preset` is 'measured'"):
        SpringTrainingArguments.from_preset("paper", output_dir=str(tmp_path), spring_preset="measured")


@pytest.mark.parametrize("preset", ["measured", "paper"])
def test_explicit_values_beat_the_preset(tmp_path, preset):
    args = SpringTrainingArguments.from_preset(
        preset, output_dir=str(tmp_path), learning_rate=2e-3, selection_ratio=0.5, num_train_epochs=1
    )
    assert (args.spring_preset, args.learning_rate, args.selection_ratio, args.num_train_epochs) == (
        preset, 2e-3, 0.5, 1,
    )  # fmt: skip
    assert SpringTrainingArguments(output_dir=str(tmp_path), spring_preset=preset, learning_rate="auto").learning_rate == (
        "auto"
    )  # fmt: skip


def test_learning_rate_is_auto_or_a_positive_float(tmp_path):
    assert SpringTrainingArguments(output_dir=str(tmp_path), learning_rate=" AUTO ").learning_rate == "auto"
    assert SpringTrainingArguments(output_dir=str(tmp_path), learning_rate="3e-3").learning_rate == 3e-3  # a CLI's str
    assert SpringTrainingArguments(output_dir=str(tmp_path), learning_rate=1).learning_rate == 1.0
    for bad in ("fast", "", "nan", -1e-4, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="`learning_rate`"):
            SpringTrainingArguments(output_dir=str(tmp_path), learning_rate=bad)
    for bad in (True, [1e-3], {"lr": 1e-3}):
        with pytest.raises(TypeError, match="`learning_rate`"):
            SpringTrainingArguments(output_dir=str(tmp_path), learning_rate=bad)


def test_the_resolved_values_survive_copies_and_json(tmp_path):
    paper = SpringTrainingArguments.from_preset("paper", output_dir=str(tmp_path))
    copied = dataclasses.replace(paper, buffer_size=9)
    assert (copied.spring_preset, copied.learning_rate, copied.selection_ratio) == ("paper", 1e-4, 0.3)
    for args in (paper, SpringTrainingArguments(output_dir=str(tmp_path))):
        data = json.loads(args.to_json_string())
        assert data["learning_rate"] == args.learning_rate and data["spring_preset"] == args.spring_preset
        again = SpringTrainingArguments(**data)
        assert (again.learning_rate, again.selection_ratio, again.num_train_epochs) == (
            args.learning_rate, args.selection_ratio, args.num_train_epochs,
        )  # fmt: skip
    assert "spring_preset" in SpringTrainingArguments(output_dir=str(tmp_path)).spring_dict()
    resolved = SpringTrainingArguments(output_dir=str(tmp_path)).with_learning_rate(3e-3)
    assert resolved.learning_rate == 3e-3 and resolved.selection_ratio == 1.0
    with pytest.raises(ValueError, match="`learning_rate`"):
        resolved.with_learning_rate(0.0)


def test_the_default_learning_rate_follows_the_model_size():
    assert [default_learning_rate(n) for n in (135_000_000, 499_999_999, 500_000_000, 1_700_000_000)] == [
        3e-3, 3e-3, 1e-3, 1e-3,
    ]  # fmt: skip
    assert default_learning_rate(3_000_000_000) == default_learning_rate(70_000_000_000) == 2e-4
    tiny = torch.nn.Linear(4, 4)
    assert default_learning_rate(tiny) == 3e-3
    with pytest.raises(ValueError, match="model_or_num_params"):
        default_learning_rate(0)
    with pytest.raises(TypeError, match="model_or_num_params"):
        default_learning_rate("135M")


def test_lora_weights_do_not_count_as_model_parameters():
    from peft import LoraConfig, get_peft_model
    from testing_utils import TRAINING_VOCAB, make_model

    from transformers_spring.training.spring_config import count_model_parameters

    model = make_model("llama", TRAINING_VOCAB.size)
    before = count_model_parameters(model)
    assert before == model.num_parameters()
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert count_model_parameters(peft) == before


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
        ("learning_rate", "fast", ValueError),
        ("learning_rate", -1.0, ValueError),
        ("spring_preset", "fast", ValueError),
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
    assert (args.learning_rate, args.spring_preset) == ("auto", "measured")  # unset: the preset's


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ("auto", 1.0, 2.0)),
        (["--learning_rate", "auto"], ("auto", 1.0, 2.0)),
        (["--learning_rate", "3e-3"], (3e-3, 1.0, 2.0)),
        (["--spring_preset", "paper"], (1e-4, 0.3, 2.0)),
        (["--spring_preset", "paper", "--learning_rate", "3e-3", "--num_train_epochs", "1"], (3e-3, 0.3, 1.0)),
    ],
)
def test_a_plain_hf_argument_parser_takes_the_preset_and_the_learning_rate(tmp_path, argv, expected):
    # HfArgumentParser parses the `float | str | None` field as a str: the arguments turn a number's text into it.
    (args,) = HfArgumentParser(SpringTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), *argv]
    )
    assert (args.learning_rate, args.selection_ratio, args.num_train_epochs) == expected
    with pytest.raises(ValueError, match="`learning_rate`"):
        HfArgumentParser(SpringTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--learning_rate", "fast"]
        )


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
    text = HfArgumentParser(SpringTrainingArguments).format_help()
    assert "--selection_ratio" in text and "--spring_preset" in text and "--learning_rate" in text
