"""`spring train` (training/train_job.py, training/train_job_config.py) on a tiny model saved to disk, driven through
the command line as a user runs it."""

import json
from unittest import mock

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_interactions, make_model, make_tokenizer

from transformers_spring import SpringForCausalLM
from transformers_spring.cli import main
from transformers_spring.data import write_interactions_jsonl
from transformers_spring.training import ContinualPersonalizer

USERS = ("alice", "bob", "Ron Dicker")
TRAIN_FLAGS = [
    "--num_periods", "2", "--encoder", "hashing", "--learning_rate", "5e-2", "--num_train_epochs", "1",
    "--lora_dropout", "0", "--use_cpu", "true", "--buffer_size", "3",
]  # fmt: skip


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny-model"
    make_model("llama", TRAINING_VOCAB.size).save_pretrained(path)
    make_tokenizer(TRAINING_VOCAB, chat=True).save_pretrained(path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "stream.jsonl"
    items = [it for user in USERS for it in make_interactions(user, 8)]
    write_interactions_jsonl(sorted(items, key=lambda it: it.timestamp), path)
    return path


def train(data, model_dir, out, *extra):
    return main(["train", "--data", str(data), "--model", str(model_dir), "--out", str(out), *TRAIN_FLAGS, *extra])


def refused(capsys, data, model_dir, out, *extra) -> str:
    """`spring train` exits with 2 and one message on stderr (no traceback); returns the message."""
    capsys.readouterr()
    assert train(data, model_dir, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("spring train: ") and "Traceback" not in err
    return err


def adapters(out):
    p = ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), out)
    return {user: p.state_dict(user) for user in p.users}


def test_train_saves_a_state_that_decodes_personalized(tmp_path, data, model_dir, capsys):
    out = tmp_path / "state"
    assert train(data, model_dir, out) == 0
    printed = capsys.readouterr().out
    assert "3 user(s) trained in this run" in printed and "| Ron Dicker | 2 | 8 |" in printed
    assert "train_runtime" not in printed and "spring/period" not in printed  # no Trainer dicts on stdout
    job = json.loads((out / "train_job.json").read_text())
    assert job["num_periods"] == 2 and len(job["data_sha256"]) == 64
    state = json.loads((out / "continual_state.json").read_text())
    assert {u: e["next_period"] for u, e in state["users"].items()} == dict.fromkeys(USERS, 2)
    config = json.loads((out / "spring_config.json").read_text())
    # The measured decoding defaults (λ 0.25 from the whole stream, no gate), saved as values.
    assert (config["interpolation_weight"], config["top_k"], config["retrieval_region"]) == (0.25, 2, "all")
    assert config["gate"] is None and config["use_global"] is False and config["spring_preset"] == "measured"

    spring = SpringForCausalLM.from_pretrained(out)
    tokenizer = spring.tokenizer
    assert tokenizer.padding_side == "left"  # saved without a side (right by default), loaded ready for generate
    inputs = tokenizer(["<|im_start|> user : w1 w2 cats <|im_end|>\n<|im_start|> assistant :"], return_tensors="pt")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    personal = spring.generate(**inputs, personalization="Ron Dicker", **kwargs)
    assert spring.last_personalization[0].adapter == "Ron_Dicker"
    with spring.base_model.disable_adapter():
        plain = spring.base_model.generate(**inputs, **kwargs)
    assert not torch.equal(personal, plain)  # the user's adapter changes what the tiny model says


def test_the_paper_preset_gives_the_papers_decoding_and_explicit_options_win(tmp_path, data, model_dir):
    out = tmp_path / "paper"
    assert train(data, model_dir, out, "--spring_preset", "paper", "--top_k", "3") == 0
    config = json.loads((out / "spring_config.json").read_text())
    assert (config["interpolation_weight"], config["top_k"], config["retrieval_region"]) == (0.5, 3, "buffer")
    assert isinstance(config["gate"], float)  # the paper's Q3 gate, computed from the training prompts
    training = json.loads((out / "training_args.json").read_text())
    assert (training["spring_preset"], training["selection_ratio"]) == ("paper", 0.3)  # (`train` sets the lr)


def test_a_stopped_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, data, model_dir, capsys, caplog):
    whole = tmp_path / "whole"
    assert train(data, model_dir, whole) == 0

    out = tmp_path / "stopped"
    real = ContinualPersonalizer.observe
    calls = []

    def observe(self, user, items, **kwargs):
        calls.append(user)
        if len(calls) == 3:  # the second user's first period: as if the process were killed there
            raise KeyboardInterrupt
        return real(self, user, items, **kwargs)

    with mock.patch.object(ContinualPersonalizer, "observe", observe), pytest.raises(KeyboardInterrupt):
        train(data, model_dir, out)
    state = json.loads((out / "continual_state.json").read_text())
    assert list(state["users"]) == ["alice"]  # the checkpoint after the first user

    with caplog.at_level("WARNING"):
        assert train(data, model_dir, out) == 0
    assert "Resuming the `spring train` run" in caplog.text and "1 of 3 user(s) already trained" in caplog.text
    assert "2 user(s) trained in this run, 1 resumed" in capsys.readouterr().out
    resumed, expected = adapters(out), adapters(whole)
    assert resumed.keys() == expected.keys()
    for user in expected:
        for key, value in expected[user].items():
            torch.testing.assert_close(resumed[user][key], value, rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_data_or_settings(tmp_path, data, model_dir, capsys):
    out = tmp_path / "state"
    assert train(data, model_dir, out, "--users", "alice,bob", "--since", "2001-09-09") == 0
    same = ("--users", " bob , alice", "--since", "2001-09-09T00:00:00Z")  # the same run, written another way
    assert train(data, model_dir, out, *same) == 0
    for extra, changed in [
        (("--selection_ratio", "0.5"), "spring_args.selection_ratio"),
        (("--learning_rate", "1e-2"), "training_args.learning_rate"),
        (("--interpolation_weight", "0.9"), "interpolation_weight"),
        (("--top_k", "3"), "top_k"),
        (("--users", "alice"), "data_sha256, users"),  # (the digest covers the users' items)
    ]:
        args = [*same[2:], *extra] if extra[0] == "--users" else [*same, *extra]
        assert f"other data or settings ({changed} differ)" in refused(capsys, data, model_dir, out, *args)
    assert "--resume true" in refused(capsys, data, model_dir, out, *same, "--resume", "false")
    data.write_text(data.read_text().replace("w1", "w2"))
    assert "(data_sha256 differ)" in refused(capsys, data, model_dir, out, *same)


def test_a_bad_record_names_its_line_and_field(tmp_path, data, model_dir, capsys):
    lines = data.read_text().splitlines()
    row = json.loads(lines[4])
    row["response"] = 7
    lines[4] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    assert "line 5: invalid field 'response'" in refused(capsys, data, model_dir, tmp_path / "state")
    row = json.loads(lines[2])
    lines[4] = json.dumps(row)  # a repeated id: refused by line before any user is trained
    data.write_text("\n".join(lines) + "\n")
    assert "line 5: field 'id'" in refused(capsys, data, model_dir, tmp_path / "state")
    assert not (tmp_path / "state").exists()  # nothing is written before the data is read


def test_users_window_and_typos(tmp_path, data, model_dir, capsys):
    err = refused(capsys, data, model_dir, tmp_path / "a", "--users", "alice, Ron Dickr")  # (spaces around commas go)
    assert "`users`: no interactions for ['Ron Dickr']" in err and "closest ids: {'Ron Dickr': ['Ron Dicker']}" in err
    # Each user's 8 items are 1e9 + 0..7: the window keeps items 2..5, cut into 2 periods of 2.
    assert train(data, model_dir, tmp_path / "b", "--users", "bob", "--since", "1000000002", "--until",
                 "1000000006") == 0  # fmt: skip
    assert "| bob | 2 | 4 |" in capsys.readouterr().out
    assert "`since` must be an ISO-8601" in refused(capsys, data, model_dir, tmp_path / "c", "--since", "yesterday")


def test_config_file_gives_options_and_flags_win(tmp_path, data, model_dir, capsys):
    options = tmp_path / "tuned.json"
    options.write_text(json.dumps({"options": {"selection_ratio": 0.5, "lora_r": 4, "users": "bob"}}))
    out = tmp_path / "state"
    assert train(data, model_dir, out, "--config", str(options), "--lora_r", "2") == 0
    saved = json.loads((out / "train_job.json").read_text())
    assert saved["users"] == ["bob"] and saved["spring_args"]["selection_ratio"] == 0.5
    assert saved["spring_args"]["lora_r"] == 2
    options.write_text(json.dumps({"learning_rat": 1e-3}))
    err = refused(capsys, data, model_dir, tmp_path / "other", "--config", str(options))
    assert "unknown option(s) ['learning_rat']" in err


def test_spring_memory_prints_counts_and_text_only_when_asked(tmp_path, data, model_dir, capsys):
    out = tmp_path / "state"
    assert train(data, model_dir, out, "--users", "alice,bob", "--selection_ratio", "0.3") == 0  # 2 of 4 kept
    capsys.readouterr()
    assert main(["memory", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a state with 2 user(s), 16 history record(s)" in printed
    assert "| alice | 8 | 2 |" in printed and "| False | alice | 2 | 8 |" in printed  # never shared by default
    first = make_interactions("alice", 8)[0]
    assert first.prompt not in printed  # counts, never text
    assert main(["memory", str(out), "--user", "alice", "--show_text"]) == 0
    assert first.prompt in capsys.readouterr().out
    assert main(["memory", str(out), "--user", "alic"]) == 2
    assert "closest: ['alice']" in capsys.readouterr().err
    assert main(["memory", str(tmp_path / "nothing")]) == 2
    assert "no local folder" in capsys.readouterr().err


def test_the_parser_takes_training_flags_and_the_out_of_a_config(tmp_path):
    from transformers_spring.cli import _train_parser

    options = tmp_path / "o.json"
    options.write_text(json.dumps({"out": str(tmp_path / "from-config")}))
    argv = ["--data", "x.jsonl", "--config", str(options), "--no_dataloader_pin_memory"]
    job, args = _train_parser(argv).parse_args_into_dataclasses(args=argv)
    assert args.dataloader_pin_memory is False and job.out == str(tmp_path / "from-config")
    assert args.output_dir == str(tmp_path / "from-config" / "trainer_output")
    assert args.disable_tqdm and args.logging_strategy == "no"  # the job's defaults
    # The learning rate, selection and epochs: the measured preset's, not the paper's 1e-4 and 30 %.
    assert (args.spring_preset, args.learning_rate, args.selection_ratio, args.num_train_epochs) == (
        "measured", "auto", 1.0, 2.0,
    )  # fmt: skip
    argv = ["--data", "x.jsonl", "--config", str(options), f"--out={tmp_path / 'flag'}"]
    job, args = _train_parser(argv).parse_args_into_dataclasses(args=argv)
    assert job.out == str(tmp_path / "flag") and args.output_dir == str(tmp_path / "flag" / "trainer_output")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--learning_rate", "auto"], ("measured", "auto", 1.0)),
        (["--learning_rate", "3e-3"], ("measured", 3e-3, 1.0)),
        (["--learning-rate", "AUTO"], ("measured", "auto", 1.0)),
        (["--spring_preset", "paper"], ("paper", 1e-4, 0.3)),
        (["--spring_preset", "paper", "--learning_rate", "auto"], ("paper", "auto", 0.3)),
        (["--spring_preset", "paper", "--selection_ratio", "1"], ("paper", 1e-4, 1.0)),
    ],
)
def test_the_parser_takes_the_preset_and_auto_or_a_float_learning_rate(flags, expected):
    from transformers_spring.cli import _train_parser

    argv = ["--data", "x.jsonl", *flags]
    _, args = _train_parser(argv).parse_args_into_dataclasses(args=argv)
    assert (args.spring_preset, args.learning_rate, args.selection_ratio) == expected


def test_the_parser_refuses_a_bad_learning_rate_by_name(capsys, tmp_path):
    from transformers_spring.cli import _train_parser

    for value in ("fast", "-1e-3", "0"):
        argv = ["--data", "x.jsonl", f"--learning_rate={value}"]
        with pytest.raises(SystemExit) as exit_info:
            _train_parser(argv).parse_args_into_dataclasses(args=argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --learning_rate" in err and "must be 'auto' or a positive float" in err and value in err
    options = tmp_path / "o.json"  # a `--config` value goes through the same check
    options.write_text(json.dumps({"learning_rate": "fast"}))
    argv = ["--data", "x.jsonl", "--config", str(options)]
    with pytest.raises(SystemExit):
        _train_parser(argv).parse_args_into_dataclasses(args=argv)
    assert "argument --learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train_parser(["--spring_preset", "fast"]).parse_args_into_dataclasses(args=["--spring_preset", "fast"])
    assert "argument --spring_preset" in capsys.readouterr().err


def test_train_help_lists_the_preset_and_the_learning_rate(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    printed = capsys.readouterr().out
    assert "--spring_preset {measured,paper}" in printed and "--learning_rate" in printed
    assert "'auto'" in printed and "'paper'" in printed


def test_auto_learning_rate_is_recorded_as_asked_and_resumed_as_chosen(tmp_path, model_dir, capsys, monkeypatch):
    from transformers_spring.training import continual

    # Two users of 24 items: period 0 holds 12, enough for the search (on alice, the first); bob's is not searched.
    path = tmp_path / "long.jsonl"
    write_interactions_jsonl(sorted([it for u in ("alice", "bob") for it in make_interactions(u, 24)],
                                    key=lambda it: it.timestamp), path)  # fmt: skip
    scored = []

    def score(model, samples, args, pad_token_id):  # 1e-3 wins: not the size default, so a lost choice would show
        scored.append([s.id for s in samples])
        return (1.0, 2.0)[(len(scored) - 1) % 2]

    monkeypatch.setattr(continual, "held_out_nll", score)
    flags = ["--learning_rate", "auto", "--selection_ratio", "0.5"]  # (the last --learning_rate wins)
    whole = tmp_path / "whole"
    assert train(path, model_dir, whole, *flags) == 0
    assert "learning_rate auto: 0.001 (validation)." in capsys.readouterr().out
    assert scored == [["alice-10", "alice-11"]] * 2
    job = json.loads((whole / "train_job.json").read_text())
    assert job["training_args"]["learning_rate"] == "auto" and "spring_preset" not in job["spring_args"]
    choice = json.loads((whole / "continual_state.json").read_text())["learning_rate_choice"]
    assert choice["learning_rate"] == 1e-3 and choice["rule"] == "validation"

    out = tmp_path / "stopped"
    real, calls = ContinualPersonalizer.observe, []

    def observe(self, user, items, **kwargs):
        calls.append(user)
        if len(calls) == 3:  # bob's first period: the state saved after alice holds the choice
            raise KeyboardInterrupt
        return real(self, user, items, **kwargs)

    with mock.patch.object(ContinualPersonalizer, "observe", observe), pytest.raises(KeyboardInterrupt):
        train(path, model_dir, out, *flags)
    scored.clear()
    assert train(path, model_dir, out, *flags) == 0
    assert scored == []  # resumed with the saved choice: no second search (bob has 12 period-0 items too)
    assert json.loads((out / "continual_state.json").read_text())["learning_rate_choice"] == choice
    resumed, expected = adapters(out), adapters(whole)
    for user in expected:
        for key, value in expected[user].items():
            torch.testing.assert_close(resumed[user][key], value, rtol=1e-5, atol=1e-6)
    # A run asked with another learning rate is another run.
    err = refused(capsys, path, model_dir, out, "--learning_rate", "1e-3", "--selection_ratio", "0.5")
    assert "training_args.learning_rate differ" in err and "saved: learning_rate='auto'" in err


def test_a_run_saved_before_a_fingerprint_key_existed_still_resumes(tmp_path, data, model_dir, caplog):
    out = tmp_path / "state"
    assert train(data, model_dir, out, "--users", "alice") == 0
    job = json.loads((out / "train_job.json").read_text())
    saved = dict(job["fingerprint"] if "fingerprint" in job else job)
    assert saved.pop("adaptive_weight") == 0.0  # what an earlier release did not write
    (out / "train_job.json").write_text(json.dumps({**job, "fingerprint": saved} if "fingerprint" in job else saved))
    assert train(data, model_dir, out, "--users", "alice") == 0  # the same run: resumed, not refused
