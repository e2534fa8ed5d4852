"""`spring tune` (training/tuning.py, training/tuning_config.py): validation-only, cost-bounded search on tiny models."""

import json
from unittest import mock

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_args, make_interactions, make_model, make_tokenizer

from transformers_spring.cli import main
from transformers_spring.data import write_interactions_jsonl
from transformers_spring.generation import SpringForCausalLM
from transformers_spring.records import Interaction
from transformers_spring.training import ContinualPersonalizer, SpringFormatter
from transformers_spring.training.tuning import PersonalizationTuner
from transformers_spring.training.tuning_config import TuningArguments

SMALL_GRID = {"learning_rates": "5e-2", "epochs": "1", "selections": "drift0.5,all", "interpolation_weights": "0,0.5,1",
              "gates": "off", "top_ks": "2", "regions": "history", "encoder": "hashing", "num_periods": 3}  # fmt: skip
REAL_SCORE = SpringForCausalLM.score


def tuner(tmp_path, items, **overrides):
    args = TuningArguments(**{**SMALL_GRID, **overrides})
    training = make_args(tmp_path, num_train_epochs=1, buffer_size=3)
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    return PersonalizationTuner(model, tokenizer, items, training, args, progress=False)


def repeating_stream(user: str, n_fit: int = 4, repeat: bool = True) -> list[Interaction]:
    """`n_fit` items, then as many more whose prompt and response repeat the earlier ones (`repeat`) or are new."""
    items = make_interactions(user, 2 * n_fit)
    fit = items[:n_fit]
    later = [
        Interaction(
            user,
            fit[i].prompt if repeat else it.prompt,
            fit[i].response if repeat else f"sun rain w{70 + i}",
            timestamp=it.timestamp,
            id=it.id,
        )  # fmt: skip
        for i, it in enumerate(items[n_fit:])
    ]
    return fit + later


def history_aware_score(self, input_ids, continuations, attention_mask=None, personalization=None):
    """The real planning (retrieval, gate, λ) with scripted probabilities: the history path gives a gold response
    0.9 per token when a retrieved item holds exactly that response, 0.01 otherwise; the adapter path 0.1."""
    REAL_SCORE(self, input_ids, continuations, attention_mask, personalization)
    row = self.last_personalization[0]
    gold = self.tokenizer.decode(continuations[0], skip_special_tokens=True).strip()
    hit = any(getattr(it, "interaction", it).response == gold for it in row.items)
    weight = row.weight if row.gate_open else 0.0
    p = weight * (0.9 if hit else 0.01) + (1 - weight) * 0.1
    return [torch.full((len(continuations[0]),), float(torch.log(torch.tensor(p))))]


# (a) ----------------------------------------------------------------------------------------------------- leaks
def test_trains_and_scores_only_given_items_and_never_validation_before_scoring(tmp_path):
    items = [it for user in ("alice", "bob") for it in make_interactions(user, 6)]
    held_back = make_interactions("alice", 3, start=6)  # a caller's test items: never passed in
    t = tuner(tmp_path, items)
    folds, _ = t.folds()
    validation = {it.id for _, val in folds.values() for it in val}
    formatter = SpringFormatter.from_args(t.tokenizer, t.training_args)
    by_tokens = {formatter.encode(it).input_ids: it.id for it in items + held_back}
    events = []
    real_observe = ContinualPersonalizer.observe

    def observe(self, user, interactions, **kwargs):
        events.append(("train", [it.id for it in interactions]))
        return real_observe(self, user, interactions, **kwargs)

    def score(self, input_ids, continuations, attention_mask=None, personalization=None):
        out = REAL_SCORE(self, input_ids, continuations, attention_mask, personalization)
        events.append(("score", by_tokens[tuple(input_ids[0].tolist()) + tuple(continuations[0])]))
        retrieved = [getattr(it, "interaction", it).id for it in self.last_personalization[0].items]
        events.append(("retrieved", retrieved))
        return out

    with (
        mock.patch.object(ContinualPersonalizer, "observe", observe),
        mock.patch.object(SpringForCausalLM, "score", score),
    ):
        result = t.tune()
    trained = {i for kind, ids in events if kind == "train" for i in ids}
    scored = {i for kind, i in events if kind == "score"}
    retrieved = {i for kind, ids in events if kind == "retrieved" for i in ids}
    given = {it.id for it in items}
    assert trained and trained <= given - validation  # only the fit periods train
    assert scored == validation  # every validation item is scored, nothing else
    assert not retrieved & validation and not (trained | scored | retrieved) & {it.id for it in held_back}
    assert result.validation["validation_items"] == {"alice": 2, "bob": 2}


# (b) ----------------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("repeat, expected", [(True, 1.0), (False, 0.0)])
def test_lambda_follows_whether_history_predicts_the_response(tmp_path, repeat, expected):
    items = [it for user in ("alice", "bob") for it in repeating_stream(user, repeat=repeat)]
    t = tuner(tmp_path, items, num_periods=2, selections="all")
    with mock.patch.object(SpringForCausalLM, "score", history_aware_score):
        result = t.tune()
    assert result.options["interpolation_weight"] == expected
    assert result.spring_config["retrieval_region"] == "history" == result.options["retrieval_region"]
    assert not result.notes  # every choice is a `spring train` option


def adaptive_aware_score(self, input_ids, continuations, attention_mask=None, personalization=None):
    """As `history_aware_score`, where an adaptive λ (β > 0, 0 < λ < 1) follows the confident path: the history
    path's 0.9 on a hit, the adapter's 0.1 on a miss; any fixed λ mixes both."""
    REAL_SCORE(self, input_ids, continuations, attention_mask, personalization)
    row = self.last_personalization[0]
    gold = self.tokenizer.decode(continuations[0], skip_special_tokens=True).strip()
    hit = any(getattr(it, "interaction", it).response == gold for it in row.items)
    weight = row.weight if row.gate_open else 0.0
    if row.adaptive_weight > 0 and 0 < weight < 1:
        p = 0.9 if hit else 0.1
    else:
        p = weight * (0.9 if hit else 0.01) + (1 - weight) * 0.1
    return [torch.full((len(continuations[0]),), float(torch.log(torch.tensor(p))))]


def half_repeating_stream(user: str) -> list[Interaction]:
    """Validation items of which half repeat an earlier response and half are new."""
    repeat, new = repeating_stream(user, repeat=True), repeating_stream(user, repeat=False)
    return repeat[:4] + [repeat[4], new[5], repeat[6], new[7]]


@pytest.mark.parametrize("stream, expected", [(half_repeating_stream, 3.0), (repeating_stream, 0.0)])
def test_adaptive_lambda_is_chosen_when_it_beats_every_fixed_lambda(tmp_path, stream, expected):
    items = [it for user in ("alice", "bob") for it in stream(user)]
    t = tuner(tmp_path, items, num_periods=2, selections="all", interpolation_weights="0,0.5,1",
              adaptive_weights="0,3", top_ks="1,2")  # fmt: skip
    with mock.patch.object(SpringForCausalLM, "score", adaptive_aware_score):
        result = t.tune()
    assert result.options["adaptive_weight"] == expected == result.spring_config["adaptive_weight"]
    adaptive = [tr for tr in result.trials if tr["stage"] == "decoding" and tr["adaptive_weight"] > 0]
    assert [tr["interpolation_weight"] for tr in adaptive] == [0.5]  # only λ strictly inside (0, 1)
    # β is tried on the best retrieval setting among the mixed trials (at λ = 0 every setting ties).
    mixed = [tr for tr in result.trials if tr["stage"] == "decoding" and tr["adaptive_weight"] == 0
             and 0 < tr["interpolation_weight"] < 1]  # fmt: skip
    best = min(mixed, key=lambda tr: tr["validation_nll"])
    assert all((tr["top_k"], tr["retrieval_region"]) == (best["top_k"], best["retrieval_region"]) for tr in adaptive)
    if expected:
        assert result.options["interpolation_weight"] == 0.5
    else:  # every repeat is a hit: λ = 1 alone is best, and stays fixed
        assert result.options["interpolation_weight"] == 1.0


# (c) ----------------------------------------------------------------------------------------------------- bad input
def test_too_few_items_empty_grids_and_unknown_knobs_name_the_field(tmp_path):
    t = tuner(tmp_path, make_interactions("alice", 2))  # 3 periods need 3 items
    with pytest.raises(ValueError, match="`num_periods`=3.*`min_items`=0"):
        t.tune()
    for field, value, message in [
        ("learning_rates", " , ", "`learning_rates` is an empty grid"),
        ("selections", "drift0.3,best", "`selections`: unknown selection 'best'"),
        ("selections", "random0.3", "`selections`: 'random0.3': random selection is not supported"),
        ("gates", "q2", "`gates` must be"),
        ("gates", "auto", "`gates`: unknown gate 'auto'"),
        ("regions", "buffer,global", "`regions`: unknown region 'global'"),
        ("top_ks", "two", "`top_ks`: 'two'"),
        ("interpolation_weights", "0,1.5", "`interpolation_weights` must be"),
        ("num_periods", 1, "`num_periods` must be"),
        ("adaptive_weights", "0,-1", "`adaptive_weights` must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            TuningArguments(**{field: value})


# (d) ----------------------------------------------------------------------------------------------------- CLI
def test_the_saved_file_drives_spring_train(tmp_path, capsys):
    model_dir = tmp_path / "tiny-model"
    make_model("llama", TRAINING_VOCAB.size).save_pretrained(model_dir)
    make_tokenizer(TRAINING_VOCAB, chat=True).save_pretrained(model_dir)
    data = tmp_path / "stream.jsonl"
    write_interactions_jsonl([it for user in ("alice", "bob") for it in make_interactions(user, 6)], data)
    tuned = tmp_path / "tuned.json"
    common = ["--data", str(data), "--model", str(model_dir), "--use_cpu", "true", "--lora_dropout", "0",
              "--buffer_size", "3", "--encoder", "hashing"]  # fmt: skip
    grid = [f"--{k}={v}" for k, v in SMALL_GRID.items() if k != "encoder"] + ["--gates", "off,q0.75"]
    out_dir = ["--output_dir", str(tmp_path / "trainer")]
    assert main(["tune", *common, *grid, *out_dir, "--out", str(tuned)]) == 0
    printed = capsys.readouterr().out
    assert "| stage | lr |" in printed and "Chosen: " in printed
    saved = json.loads(tuned.read_text())
    assert set(saved) == {"options", "spring_config", "report"} and saved["report"]["trials"]
    options = saved["options"]
    assert options["learning_rate"] == 5e-2 and options["num_periods"] == 3

    state = tmp_path / "state"
    assert main(["train", *common, "--config", str(tuned), "--out", str(state)]) == 0
    job = json.loads((state / "train_job.json").read_text())
    assert job["interpolation_weight"] == options["interpolation_weight"] and job["top_k"] == options["top_k"]
    for name in ("gate", "retrieval_region", "copy_weight"):
        assert job[name] == options[name], name
    assert job["num_periods"] == 3
    config = json.loads((state / "spring_config.json").read_text())
    assert (
        config["retrieval_region"] == options["retrieval_region"] and config["copy_weight"] == options["copy_weight"]
    )
    assert options["gate"] == "off" and config["gate"] is None
    assert job["spring_args"]["selection_ratio"] == options["selection_ratio"]
    assert job["training_args"]["learning_rate"] == 5e-2

    capsys.readouterr()
    assert main(["tune", *common, "--selections", "random0.3", "--out", str(tuned)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spring tune: `selections`") and "Traceback" not in err


# (e) ----------------------------------------------------------------------------------------------------- cost
def test_successive_halving_stays_within_max_cost(tmp_path):
    items = [it for user in ("u0", "u1", "u2", "u3") for it in make_interactions(user, 6)]
    t = tuner(tmp_path, items, selections="drift0.5,all", epochs="1,2", interpolation_weights="0", max_cost=2.5)
    result = t.tune()
    cost = result.cost
    assert cost["one_pass_samples"] == 4 * 4  # 4 users x (2 + 2) items of periods 0 and 1
    assert cost["samples"] <= 2.5 * cost["one_pass_samples"] and cost["ratio"] <= 2.5
    training = [trial for trial in result.trials if trial["stage"] == "training"]
    assert sum(trial["trained_samples"] for trial in training) == cost["samples"]
    assert {trial["rung"] for trial in training} >= {0, 1} and len({trial["selection"] for trial in training}) == 2
    assert result.pareto and all(trial["rung"] == 0 for trial in result.pareto)
    # The candidates' adapters are removed (peft keeps a model's last adapter: zeroed, at most one is left).
    assert len([name for name in t.model.peft_config if "__tune" in name]) <= 1


def test_history_is_rendered_as_the_tuned_state_renders_it(tmp_path):
    items = [it for user in ("alice", "bob") for it in make_interactions(user, 6)]
    t = tuner(tmp_path, items)
    assert t._personalizer(t.candidates()[0]).spring_config.history_item_template == "{prompt}\n{response}"
    t = tuner(tmp_path, items)
    t.history_item_template = '"{response}" is the headline for "{prompt}"'
    config = t._personalizer(t.candidates()[0]).spring_config
    assert config.history_item_template == '"{response}" is the headline for "{prompt}"'


def test_rungs_start_with_the_users_cheapest_to_train(tmp_path):
    sizes = {"heavy": 12, "light": 6, "middle": 9}
    items = [it for user, n in sizes.items() for it in make_interactions(user, n)]
    result = tuner(tmp_path, items, rung_users=1, max_cost=50.0).tune()
    assert result.validation["tuning_users"] == ["light", "middle", "heavy"]
    first_rung = [t for t in result.trials if t["stage"] == "training" and t["rung"] == 0]
    assert first_rung and all(t["users"] == 1 for t in first_rung)  # rung 0: the lightest user alone


def test_text_only_items_never_validate(tmp_path):
    """A LaMP-7 profile tweet (its input is its answer) would reward copying: it trains but never validates."""
    alice = make_interactions("alice", 6)
    alice[-1] = Interaction("alice", alice[-1].response, alice[-1].response, timestamp=alice[-1].timestamp,
                            id=alice[-1].id, metadata={"text_only": True})  # fmt: skip
    bob = [Interaction("bob", it.response, it.response, timestamp=it.timestamp, id=it.id, metadata={"text_only": True})
           for it in make_interactions("bob", 6)]  # fmt: skip
    folds, skipped = tuner(tmp_path, alice + bob).folds()
    assert [it.id for it in folds["alice"][1]] == [alice[-2].id] and "bob" in skipped and "bob" not in folds
    with pytest.raises(ValueError, match="nothing to validate on"):
        tuner(tmp_path, bob).folds()


def test_spring_tune_on_a_lamp7_file_validates_on_the_questions(tmp_path, capsys):
    """LaMP-7: the profile tweets are text-only (trained on, never validated); the questions validate."""
    model_dir = tmp_path / "tiny-model"
    make_model("llama", TRAINING_VOCAB.size).save_pretrained(model_dir)
    make_tokenizer(TRAINING_VOCAB, chat=True).save_pretrained(model_dir)
    words = TRAINING_VOCAB.words
    questions, golds = [], []
    for u in range(2):
        profile = [{"text": f"{words[(u + i) % len(words)]} {words[(u + 2 * i) % len(words)]}", "id": f"{u}{i:02d}",
                    "date": f"2009-04-{i + 1:02d}"} for i in range(6)]  # fmt: skip
        questions.append({"id": f"q{u}", "input": "Paraphrase the following tweet without any explanation before or "
                          f"after it: {words[u]} {words[u + 1]}", "profile": profile})  # fmt: skip
        golds.append({"id": f"q{u}", "output": f"{words[u + 1]} {words[u]}"})
    data, outputs = tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"
    data.write_text(json.dumps(questions))
    outputs.write_text(json.dumps({"task": "LaMP_7", "golds": golds}))
    tuned = tmp_path / "tuned.json"
    common = ["--data", str(data), "--lamp_outputs", str(outputs), "--model", str(model_dir), "--use_cpu", "true",
              "--lora_dropout", "0", "--buffer_size", "3", "--encoder", "hashing", "--output_dir",
              str(tmp_path / "trainer")]  # fmt: skip
    grid = [f"--{k}={v}" for k, v in SMALL_GRID.items() if k not in ("encoder", "num_periods")]
    assert main(["tune", *common, *grid, "--num_periods", "2", "--lamp_queries", "true", "--out", str(tuned)]) == 0
    report = json.loads(tuned.read_text())["report"]
    assert list(report["validation"]["validation_items"].values()) == [1, 1]  # each user's question alone
    capsys.readouterr()
    assert main(["tune", *common, *grid, "--num_periods", "2", "--out", str(tuned)]) == 2  # profile tweets only
    assert "nothing to validate on" in capsys.readouterr().err
