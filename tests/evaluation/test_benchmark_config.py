"""`BenchmarkArguments`: task presets, the validation grid, and errors that name the field."""

import pytest

from transformers_spring.evaluation import BenchmarkArguments
from transformers_spring.evaluation.benchmark_config import NEWS_HISTORY_ITEM, NEWS_PROMPT, PRESETS


def test_news_is_the_default_preset():
    args = BenchmarkArguments()
    assert args.preset == "news"
    assert (args.prompt_template, args.history_item_template, args.stop_at_newline) == (
        NEWS_PROMPT, NEWS_HISTORY_ITEM, True,
    )  # fmt: skip
    assert args.data_format == "auto" and args.lamp_task is None and args.lamp_queries is False


@pytest.mark.parametrize("name", ["LaMP_4", "LaMP_7", "abstract_generation", "product_review"])
def test_each_preset_sets_the_reader_templates_and_stop(name):
    preset = PRESETS[name]
    args = BenchmarkArguments(preset=name)
    assert args.prompt_template == preset.prompt_template and "{prompt}" in args.prompt_template
    assert args.history_item_template == preset.history_item_template and "{response}" in args.history_item_template
    assert args.stop_at_newline is preset.stop_at_newline
    assert (args.data_format, args.lamp_task) == ("lamp", name)
    # One-line outputs stop at the line end; LongLaMP's long-form outputs do not.
    assert args.stop_at_newline is (name in ("LaMP_4", "LaMP_7"))


def test_lamp7_history_needs_no_prompt_and_reads_the_questions():
    args = BenchmarkArguments(preset="LaMP_7")
    assert "{prompt}" not in args.history_item_template and args.lamp_queries is True


def test_the_preset_follows_lamp_task_and_explicit_options_win():
    assert BenchmarkArguments(lamp_task="LaMP-4").preset == "LaMP_4"
    assert BenchmarkArguments(lamp_task="product_review_user").preset == "product_review"
    args = BenchmarkArguments(preset="abstract_generation", stop_at_newline=True, prompt_template="Abstract: {prompt}")
    assert args.stop_at_newline is True and args.prompt_template == "Abstract: {prompt}"
    assert args.history_item_template == PRESETS["abstract_generation"].history_item_template


def test_selection_grid():
    assert BenchmarkArguments().selection_grid() == [(lr, ep) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for ep in (1.0, 2.0)]
    assert BenchmarkArguments(learning_rates="").selection_grid() == []
    assert BenchmarkArguments(learning_rates="1e-3, 1e-3", epoch_grid="2").selection_grid() == [(1e-3, 2.0)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"preset": "LaMP_9"}, "preset"),
        ({"learning_rates": "1e-4,fast"}, "learning_rates"),
        ({"learning_rates": "-1e-4"}, "learning_rates"),
        ({"epoch_grid": "0"}, "epoch_grid"),
        ({"epoch_grid": ""}, "epoch_grid"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"test_fraction": 0.0}, "test_fraction"),  # temporal_split accepts 0 (spring train); a benchmark may not
        ({"selection_users": -1}, "selection_users"),
        ({"prompt_template": "no placeholder"}, "prompt_template"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BenchmarkArguments(**kwargs)
