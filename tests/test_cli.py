"""`spring` command line: dispatch, help, and `spring bench` end to end on a tiny saved model."""

import json

import pytest
from testing_utils import TRAINING_VOCAB, make_interactions, make_model, make_tokenizer

from transformers_spring.cli import main
from transformers_spring.data import write_interactions_jsonl


def _tiny_model_and_stream(tmp_path):
    """A tiny saved model and a two-user interaction stream, for end-to-end runs of the commands."""
    model_dir = tmp_path / "tiny"
    make_model("llama", TRAINING_VOCAB.size).save_pretrained(model_dir)
    make_tokenizer(TRAINING_VOCAB, chat=True).save_pretrained(model_dir)
    data = tmp_path / "stream.jsonl"
    write_interactions_jsonl(make_interactions("alice", 12, seed=1) + make_interactions("bob", 10, seed=2), data)
    return model_dir, data


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "spring demo" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["benchmark"]) == 2
    assert "unknown command 'benchmark'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "train", "memory", "serve", "bench", "bench-logo"])
def test_every_help_renders_without_formatting_artefacts(command, capsys):
    # argparse %-formats help text: an unescaped "30 % selection" used to print the option's internals as a dict.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: spring {command}")
    for artefact in ("{'option_strings'", "%(", "%%", "<object at", "'dest':"):
        assert artefact not in text, (command, artefact)
    if command in ("demo", "bench"):
        assert "random-30 % selection" in text


def test_serve_help_documents_every_option(capsys):
    import dataclasses

    from transformers_spring.server import ServeArguments

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(ServeArguments):
        assert f"--{f.name}" in out and f.metadata["help"].split()[0] in out, f.name


def test_serve_refuses_to_start_without_keys_or_a_state(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPRING_SERVE_API_KEYS", raising=False)
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--state", str(tmp_path / "empty")]) == 2
    assert "no API keys" in capsys.readouterr().err
    assert main(["serve", "--state", str(tmp_path / "empty"), "--no_auth", "--workdir", str(tmp_path / "w")]) == 2
    assert "neither a ContinualPersonalizer folder" in capsys.readouterr().err


def test_bench_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--methods" in out and "--users" in out and "spring-logo" in out


def test_bench_end_to_end_on_a_tiny_saved_model(tmp_path, capsys):
    model_dir, data = _tiny_model_and_stream(tmp_path)
    out = tmp_path / "out"
    code = main([
        "bench", "--data", str(data), "--model", str(model_dir), "--users", "2", "--min_items", "10",
        "--methods", "base,rag-bm25-accum,spring", "--prompt_template", "write a headline for {prompt}",
        "--max_new_tokens", "3", "--num_train_epochs", "1", "--encoder", "hashing", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| SPRInG |" in printed and "| RAG BM25 accum |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["base", "rag-bm25-accum", "spring"]
    assert sorted(results["users"]) == ["alice", "bob"]
    assert (out / "rouge_l_per_period.png").stat().st_size > 1000


def test_bench_logo_end_to_end_on_a_tiny_saved_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-logo", "--help"])
    assert exit_info.value.code == 0 and "--history_cuts" in capsys.readouterr().out
    model_dir, data = _tiny_model_and_stream(tmp_path)
    out = tmp_path / "out"
    code = main([
        "bench-logo", "--data", str(data), "--model", str(model_dir), "--users", "2", "--min_items", "10",
        "--prompt_template", "write a headline for {prompt}", "--max_new_tokens", "3", "--num_train_epochs", "1",
        "--encoder", "hashing", "--learning_rates", "", "--history_cuts", "0,all", "--mediator_min_examples", "2", "--community_min_users", "1",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert "SPRInG + consented retrieval" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert {r["cut"] for r in results["records"]} == {0, "all"}
    assert (out / "results.md").is_file()


def test_demo_tunes_decoding_around_springs_own_training_settings():
    """`spring demo` runs SPRInG tuned with a narrow search: one training point, SPRInG's own (so the tuned chain
    copies SPRInG's instead of training a second one), two users and a small decoding grid, which keeps the demo
    within 10 minutes on 2 cores."""
    from transformers_spring.cli import DEMO_DEFAULTS, _parse
    from transformers_spring.evaluation.methods import DEMO_METHODS
    from transformers_spring.training.train_job_config import BENCH_CHOSEN_TRAINING

    defaults = {**DEMO_DEFAULTS, **BENCH_CHOSEN_TRAINING, "methods": ",".join(DEMO_METHODS)}
    args = _parse([], defaults, "spring demo")
    assert "spring-tuned" in args.methods.split(",") and args.tune_max_cost == 1.0
    grid = args.tuning_arguments().grid()
    assert grid["learning_rates"] == [args.learning_rate] and grid["epochs"] == [args.num_train_epochs]
    assert grid["selections"] == [("drift0.3", args.selection_ratio)]
    decoding = 1
    for key in ("interpolation_weights", "gates", "top_ks", "regions", "copy_weights", "adaptive_weights"):
        decoding *= len(grid[key])
    assert decoding <= 20 and args.tuning_arguments().rung_users == 2
    # The grid is an ordinary option: the command line replaces it.
    assert _parse(["--tune_grid", ""], defaults, "spring demo").tuning_arguments().grid()["epochs"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown option 'lr'"):
        _parse(["--tune_grid", '{"lr": 1}'], defaults, "spring demo")


def test_bench_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="`data` file not found"):
        main(["bench", "--data", str(tmp_path / "nope.jsonl"), "--model", "unused"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], (True, False)),
        (["--no_stop_at_newline"], (False, False)),
        (["--no-stop-at-newline", "--lamp_queries"], (False, True)),
        (["--stop_at_newline", "false", "--lamp_queries", "--users", "3"], (False, True)),
        (["--preset", "abstract_generation"], (False, False)),
        (["--preset", "abstract_generation", "--stop_at_newline"], (True, False)),
        (["--preset", "LaMP_7", "--no_lamp_queries"], (True, False)),
    ],
)
def test_preset_switches_parse_like_every_other_switch(argv, expected):
    from transformers_spring.cli import _parse

    args = _parse(argv, {}, "spring bench")
    assert (args.stop_at_newline, args.lamp_queries) == expected


def test_the_preset_follows_the_outputs_file_and_every_lamp_task_has_one(tmp_path):
    from transformers_spring.cli import _parse

    outputs = tmp_path / "dev_outputs.json"
    outputs.write_text('{"task": "LongLaMP_product_review_user", "golds": []}')
    args = _parse(["--lamp_outputs", str(outputs)], {}, "spring bench")
    assert args.preset == "product_review" and args.stop_at_newline is False and args.data_format == "lamp"
    from transformers_spring.data.lamp import TASK_PRESETS

    for task in TASK_PRESETS:
        assert _parse(["--lamp_task", task], {}, "spring bench").preset == task


def test_report_rebuilds_a_saved_run(tmp_path, capsys):
    from pathlib import Path

    saved = Path(__file__).resolve().parents[1] / "docs" / "benchmark" / "demo" / "results.json"
    out = tmp_path / "again"
    assert main(["report", str(saved), str(out)]) == 0
    assert "| SPRInG |" in capsys.readouterr().out
    rebuilt, original = json.loads((out / "results.json").read_text()), json.loads(saved.read_text())
    assert rebuilt["records"] == original["records"] and rebuilt["drift_bootstrap"] == {}
    assert rebuilt["summary"]["spring"]["average"] == pytest.approx(original["summary"]["spring"]["average"])
    assert (out / "results.md").read_text() == (saved.parent / "results.md").read_text()
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_train_takes_a_preset_and_auto_or_a_float_learning_rate(tmp_path, capsys):
    from transformers_spring.cli import _train_parser

    for flags, expected in [
        ([], ("measured", "auto", 1.0)),
        (["--learning_rate", "auto"], ("measured", "auto", 1.0)),
        (["--learning_rate", "3e-3"], ("measured", 3e-3, 1.0)),
        (["--spring_preset", "paper"], ("paper", 1e-4, 0.3)),
    ]:
        argv = ["--data", "x.jsonl", *flags]
        _, args = _train_parser(argv).parse_args_into_dataclasses(args=argv)
        assert (args.spring_preset, args.learning_rate, args.selection_ratio) == expected, flags
    model_dir, data = _tiny_model_and_stream(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--model", str(model_dir), "--out", str(tmp_path / "out"),
              "--learning_rate", "fast"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "argument --learning_rate/--learning-rate: must be 'auto' or a positive float, got 'fast'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()
