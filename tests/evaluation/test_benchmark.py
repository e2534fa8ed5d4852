"""The benchmark runner on tiny models: routing of every method, temporal hygiene, scoring, outputs."""

import dataclasses
import json
import math

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_interactions, make_model, make_tokenizer

from transformers_spring.evaluation import (
    METHODS,
    BenchmarkArguments,
    ContinualBenchmark,
    markdown_table,
    resolve_methods,
    save_results,
)
from transformers_spring.generation import HistoryPromptBuilder, Personalization, SpringConfig, SpringForCausalLM
from transformers_spring.training import SpringFormatter

TEMPLATE = "write a headline for {prompt}"
# Every method but spring-tuned: the shared run below is the one release 0.1 recorded (spring-tuned has its own run).
UNTUNED = tuple(name for name, spec in METHODS.items() if spec.adapter != "tuned")
# spring-tuned's search on the tiny runs: two learning rates x two selections (neither is SPRInG's 30 %, so its chain
# trains on its own), the history region with a gate (so σ and the time order of its history are exercised), λ 0.5.
TUNE_GRID = json.dumps({
    "learning_rates": "1e-2,5e-2", "epochs": "1", "selections": "drift0.5,all", "interpolation_weights": "0.5",
    "gates": "q0.5", "top_ks": "2", "regions": "history", "copy_weights": "0,0.1", "adaptive_weights": "0",
})  # fmt: skip


def bench_args(tmp_path, **kwargs):
    defaults = dict(
        users=2, min_items=10, max_items=0, methods="all", prompt_template=TEMPLATE, max_new_tokens=4,
        generation_batch_size=1, encoder="hashing", learning_rate=5e-2, num_train_epochs=1, out=str(tmp_path / "out"),
        learning_rates="",
    )  # fmt: skip
    defaults.update(kwargs)
    return BenchmarkArguments(**defaults)


def stream():
    # Two users, 20 items each (4 per period: 3 train, 1 test), interleaved in time.
    items = make_interactions("alice", 20, seed=1) + make_interactions("bob", 20, seed=2)
    return sorted(items, key=lambda it: it.timestamp)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    bench = ContinualBenchmark(bench_args(tmp_path, methods=",".join(UNTUNED)), model, tokenizer, stream())
    captured = []
    original = bench._generate

    def spy(rows):  # keep each row with the adapter state of the moment it was decoded
        outputs = original(rows)
        for row, text in zip(rows, outputs, strict=True):
            reference = None if row.prediction is not None else plain_reference(bench, row)
            captured.append((row, text, reference))
        return outputs

    bench._generate = spy
    results = bench.run(progress=False)
    return bench, results, captured


def plain_reference(bench, row):
    """Slow reference: plain generate() of the row's model (its adapter, or the base) on the row's prompt with the
    history inserted when λ = 1 (RAG), or on the bare prompt when nothing is retrieved or λ = 0."""
    tok = bench.tokenizer
    prompt = SpringFormatter(tok, prompt_template=TEMPLATE).prompt_text(row.item)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if row.history and row.weight == 1.0:
        config = SpringConfig(history_item_template=bench.args.history_item_template)
        ids = HistoryPromptBuilder(tok, config).build(ids, row.history)
    elif row.history:
        return None  # a real mixture: covered by the generation tests' slow reference
    model = bench.peft_model
    input_ids = torch.tensor([ids])
    kwargs = dict(max_new_tokens=4, do_sample=False, repetition_penalty=1.2, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        if row.adapter == "__base__":
            with model.disable_adapter():
                out = model.generate(input_ids=input_ids, **kwargs)
        else:
            model.set_adapter(row.adapter)
            out = model.generate(input_ids=input_ids, **kwargs)
    from transformers_spring.evaluation.decoding import first_line

    return first_line(tok.decode(out[0, len(ids) :], skip_special_tokens=True))


def test_every_method_decodes_every_test_item(run):
    _, results, _ = run
    records = results["records"]
    for name in UNTUNED:
        own = [r for r in records if r["method"] == name]
        assert len([r for r in own if r["phase"] == "period"]) == 2 * 4  # 2 users x periods 1..4 x 1 test item
        assert len([r for r in own if r["phase"] == "forgetting"]) == 2
        assert all(0.0 <= r["rougeL"] <= 1.0 for r in own)
    assert set(results["summary"]) == set(UNTUNED)


def test_rows_match_plain_generation_with_their_adapter_and_prompt(run):
    _, _, captured = run
    checked = 0
    for row, text, reference in captured:
        if reference is not None:
            assert text == reference, (row.method, row.adapter)
            checked += 1
    methods = {row.method for row, _, reference in captured if reference is not None}
    assert {"base", "rag-bm25-each", "rag-dense-accum", "oppu-each", "all-100", "spring-lambda0"} <= methods
    assert checked >= 40


def test_floors_equal_hand_computations(run):
    """copy input = the test input; last response = the latest earlier training response; BM25-nearest = the
    response of the earlier training item whose input shares the most (BM25) with the test input. None reads a test
    item, none has a likelihood."""
    from transformers_spring.data import temporal_split
    from transformers_spring.memory.bm25 import BM25Index

    _, results, _ = run
    splits = temporal_split(stream(), num_periods=5, test_fraction=0.1)
    by_id = {it.id: it for it in stream()}
    checked = 0
    for r in results["records"]:
        if not METHODS[r["method"]].is_floor:
            continue
        assert r["nll"] is None
        item = by_id[r["test_id"]]
        last = r["period"] if r["phase"] == "period" else 4
        earlier = [it for s in splits[r["user"]][: last + 1] for it in s.train if it.timestamp <= item.timestamp]
        if r["method"] == "copy-input":
            expected = item.prompt
        elif r["method"] == "last-response":
            expected = max(earlier, key=lambda it: it.timestamp).response
        else:
            scores = BM25Index([it.prompt for it in earlier]).scores(item.prompt)
            best = max(range(len(earlier)), key=lambda i: (scores[i], earlier[i].timestamp, i))
            expected = earlier[best].response
        assert r["prediction"] == expected, r["method"]
        checked += 1
    assert checked == 3 * 10


def test_nll_equals_score_of_the_gold_response(run):
    """Every model method has an NLL: the mean of -log p of the gold response tokens under its decoding, which is
    `SpringForCausalLM.score` (tested against a slow hand computation in the generation tests)."""
    _, results, _ = run
    for r in results["records"]:
        if METHODS[r["method"]].is_floor:
            continue
        assert r["nll"] is not None and math.isfinite(r["nll"]) and r["nll"] > 0, r["method"]
    summary = results["summary"]
    assert math.isfinite(summary["spring"]["average"]["nll"])
    assert math.isnan(summary["copy-input"]["average"]["nll"])
    assert set(results["bootstrap"]) == set(UNTUNED) - {"spring"}
    assert results["bootstrap"]["base"]["nll"]["n"] == 8 and results["bootstrap"]["copy-input"]["nll"]["n"] == 0


def test_no_test_item_reaches_training_budget_or_gate(tmp_path, monkeypatch):
    """A leak test over every method: test items never reach a trainer, the buffer, σ calibration, spring-tuned's
    search or the decoding budget (their responses are made much longer than any training response: a leaked one
    would raise the budget)."""
    from transformers_spring.data import temporal_split
    from transformers_spring.training import tuning

    items = stream()
    splits = temporal_split(items, num_periods=5, test_fraction=0.1)
    test_ids = {it.id for periods in splits.values() for s in periods for it in s.test}
    long_tail = " ".join(["w1"] * 60)
    items = [
        dataclasses.replace(it, response=f"{it.response} {long_tail}") if it.id in test_ids else it for it in items
    ]
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    # With the validation selection on: it trains and scores too, and must see only training items.
    args = bench_args(tmp_path, max_new_tokens=0, learning_rates="1e-2,5e-2", epoch_grid="1", selection_users=0,
                      tune_grid=TUNE_GRID)  # fmt: skip
    assert args.methods == "all"  # spring-tuned included
    bench = ContinualBenchmark(args, model, tokenizer, items)
    trained, observed, tuned_on = [], [], []
    original_train, original_observe, original_tuned = bench._train, bench._observe_gate, bench._observe_tuned_gate

    def train(args, user, period, batch, name, memory=None):
        trained.extend((name, it.id) for it in batch)
        return original_train(args, user, period, batch, name, memory)

    def observe(user, train_items):
        observed.extend(it.id for it in train_items)
        return original_observe(user, train_items)

    def observe_tuned(user, train_items):
        observed.extend(it.id for it in train_items)
        return original_tuned(user, train_items)

    class RecordingTuner(tuning.PersonalizationTuner):  # what spring-tuned's search is handed
        def __init__(self, model, tokenizer, interactions, *args, **kwargs):
            tuned_on.extend(it.id for it in interactions)
            super().__init__(model, tokenizer, interactions, *args, **kwargs)

    monkeypatch.setattr(tuning, "PersonalizationTuner", RecordingTuner)
    bench._train, bench._observe_gate, bench._observe_tuned_gate = train, observe, observe_tuned
    results = bench.run(progress=False)
    assert trained and not {item for _, item in trained} & test_ids
    assert any(name.endswith("__tuned") for name, _ in trained)  # spring-tuned's own chain trained too
    assert observed and not set(observed) & test_ids
    train_ids = {it.id for periods in splits.values() for s in periods for it in s.train}
    assert set(tuned_on) == train_ids  # every training item, and nothing else
    assert results["tuning"]["training_items"] == len(train_ids)
    for memory in (bench.memory, bench.tuned_memory):
        buffered = {it.id for user in splits for it in memory.buffer(user)}
        assert buffered and not buffered & test_ids
        stored = {it.id for user in splits for it in memory.history(user)}
        assert stored and not stored & test_ids
    assert results["decoding"]["max_new_tokens"] <= 8  # training responses have 1-6 words (+1)
    validation = set(results["selection"]["validation_ids"])
    assert validation and not validation & test_ids
    assert validation <= {it.id for periods in splits.values() for it in periods[0].train}


def test_selection_picks_the_lowest_validation_nll_on_the_latest_training_items(tmp_path):
    """One fresh LoRA per grid point trained on each user's period-0 training split minus its latest 20 % (the
    validation items), scored on those; the lowest mean NLL wins and trains every LoRA method."""
    from transformers_spring.data import temporal_split

    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    items = sorted(make_interactions("alice", 50, seed=1) + make_interactions("bob", 50, seed=2),
                   key=lambda it: it.timestamp)  # fmt: skip
    args = bench_args(tmp_path, methods="base,all-100", learning_rates="1e-4,5e-2", epoch_grid="1,2",
                      selection_users=0)  # fmt: skip
    bench = ContinualBenchmark(args, model, tokenizer, items)
    used = []
    original = bench._train

    def train(train_args, user, period, batch, name, memory=None):
        used.append((name, train_args.learning_rate, train_args.num_train_epochs, [it.id for it in batch]))
        return original(train_args, user, period, batch, name, memory)

    bench._train = train
    results = bench.run(progress=False)
    selection = results["selection"]
    grid = selection["grid"]
    assert [(g["learning_rate"], g["num_train_epochs"]) for g in grid] == [(1e-4, 1), (1e-4, 2), (5e-2, 1), (5e-2, 2)]
    best = min(grid, key=lambda g: g["validation_nll"])
    assert selection["chosen"] == {
        "learning_rate": best["learning_rate"],
        "num_train_epochs": best["num_train_epochs"],
    }
    assert grid[0]["validation_nll"] != grid[-1]["validation_nll"]  # the grid points really differ
    splits = temporal_split(items, num_periods=5, test_fraction=0.1)
    expected_val = set()
    for user in ("alice", "bob"):
        train = splits[user][0].train  # 10 items: the latest 2 validate
        expected_val |= {it.id for it in train[-2:]}
        fits = [ids for name, _, _, ids in used if name == "bench_select" and ids[0].startswith(user)]
        assert fits and all(ids == [it.id for it in train[:-2]] for ids in fits)
    assert set(selection["validation_ids"]) == expected_val
    lora_runs = [(lr, ep) for name, lr, ep, _ in used if name.endswith("__all100")]
    assert lora_runs and set(lora_runs) == {(best["learning_rate"], best["num_train_epochs"])}


def tiny():
    """A fresh tiny model and tokenizer (a benchmark wraps its model with peft, so each run gets its own)."""
    return make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)


def _interrupt_after_first_user(bench):
    original, calls = bench._run_user, []

    def run_user(user, *args):
        if calls:
            raise KeyboardInterrupt("stopped")
        calls.append(user)
        return original(user, *args)

    bench._run_user = run_user


def test_a_stopped_run_resumes_from_its_checkpoint_with_the_same_results(tmp_path, caplog):
    args = bench_args(tmp_path, methods="copy-input,base,spring,all-100,spring-tuned", learning_rates="1e-2,5e-2",
                      epoch_grid="1", tune_grid=TUNE_GRID)  # fmt: skip
    full = ContinualBenchmark(args, *tiny(), stream()).run(progress=False)

    checkpoint = tmp_path / "ckpt" / "checkpoint.json"
    bench = ContinualBenchmark(args, *tiny(), stream())
    _interrupt_after_first_user(bench)
    with pytest.raises(KeyboardInterrupt):
        bench.run(progress=False, checkpoint=checkpoint)
    state = json.loads(checkpoint.read_text())
    assert state["done"] == [list(full["users"])[0]] and state["selection"] == full["selection"]
    # spring-tuned's search and its σ pool are in the checkpoint: a resumed run neither tunes again nor loses σ.
    assert state["tuning"]["options"] == full["tuning"]["options"] and state["tuned_gate_scores"]

    resumed_bench = ContinualBenchmark(args, *tiny(), stream())
    resumed_users = []
    original = resumed_bench._run_user
    resumed_bench._run_user = lambda user, *a: resumed_users.append(user) or original(user, *a)
    resumed_bench._select_hyperparameters = lambda *a: pytest.fail("the selection must come from the checkpoint")
    resumed_bench._tune = lambda *a: pytest.fail("the search must come from the checkpoint")
    with caplog.at_level("WARNING"):
        resumed = resumed_bench.run(progress=False, checkpoint=checkpoint)
    assert resumed["resumed"] and resumed_users == [list(full["users"])[1]]
    assert f"Resuming from {checkpoint}: 1 of 2 users already done" in caplog.text  # a resume is never silent
    # The total counts both sessions: at least the selection and both users' training.
    timing = resumed["timing_s"]
    assert timing["total"] >= timing["selection"] + timing["train_spring"] - 0.2
    key = lambda r: (r["method"], r["user"], r["period"], r["phase"], r["test_id"])  # noqa: E731
    assert sorted(map(key, resumed["records"])) == sorted(map(key, full["records"]))
    by_key = {key(r): r for r in full["records"]}
    for r in resumed["records"]:
        assert r["prediction"] == by_key[key(r)]["prediction"]
        assert r["nll"] == pytest.approx(by_key[key(r)]["nll"], abs=1e-5)
    assert resumed["gate_sigma"] == pytest.approx(full["gate_sigma"])
    assert resumed["tuning"]["gate_sigma"] == pytest.approx(full["tuning"]["gate_sigma"])
    assert resumed["tuning"]["options"] == full["tuning"]["options"] and timing["tuning"] > 0


def test_a_checkpoint_of_other_settings_is_not_continued(tmp_path, caplog):
    checkpoint = tmp_path / "checkpoint.json"
    bench = ContinualBenchmark(bench_args(tmp_path, methods="copy-input,base"), *tiny(), stream())
    _interrupt_after_first_user(bench)
    with pytest.raises(KeyboardInterrupt):
        bench.run(progress=False, checkpoint=checkpoint)
    other = ContinualBenchmark(bench_args(tmp_path, methods="copy-input,base", rag_k=3), *tiny(), stream())
    results = other.run(progress=False, checkpoint=checkpoint)
    assert not results["resumed"] and len(results["users"]) == 2
    # Same settings, but one item's text edited: another split, not continued either.
    bench = ContinualBenchmark(bench_args(tmp_path, methods="copy-input,base"), *tiny(), stream())
    _interrupt_after_first_user(bench)
    with pytest.raises(KeyboardInterrupt):
        bench.run(progress=False, checkpoint=checkpoint)
    edited = stream()
    edited[0] = dataclasses.replace(edited[0], response=edited[0].response + " w7")
    again = ContinualBenchmark(bench_args(tmp_path, methods="copy-input,base"), *tiny(), edited)
    assert not again.run(progress=False, checkpoint=checkpoint)["resumed"]
    checkpoint.write_text("{not json")
    assert not ContinualBenchmark(bench_args(tmp_path, methods="copy-input"), *tiny(), stream()).run(
        progress=False, checkpoint=checkpoint
    )["resumed"]


def test_a_checkpoint_without_a_newer_setting_at_its_default_is_continued(tmp_path):
    checkpoint = tmp_path / "checkpoint.json"
    bench = ContinualBenchmark(bench_args(tmp_path, methods="copy-input"), *tiny(), stream())
    _interrupt_after_first_user(bench)
    with pytest.raises(KeyboardInterrupt):
        bench.run(progress=False, checkpoint=checkpoint)
    state = json.loads(checkpoint.read_text())
    del state["fingerprint"]["lamp_queries"]  # as written before the setting existed
    checkpoint.write_text(json.dumps(state))
    again = ContinualBenchmark(bench_args(tmp_path, methods="copy-input"), *tiny(), stream())
    assert again.run(progress=False, checkpoint=checkpoint)["resumed"]
    state["fingerprint"]["lamp_queries"] = True  # not the default: another run
    checkpoint.write_text(json.dumps(state))
    again = ContinualBenchmark(bench_args(tmp_path, methods="copy-input"), *tiny(), stream())
    assert not again.run(progress=False, checkpoint=checkpoint)["resumed"]


def test_run_benchmark_removes_its_checkpoint_once_results_are_saved(tmp_path):
    from transformers_spring.evaluation import run_benchmark

    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    args = bench_args(tmp_path, methods="copy-input,base")
    run_benchmark(args, progress=False, model=model, tokenizer=tokenizer, interactions=stream())
    out = tmp_path / "out"
    assert (out / "results.json").is_file() and not (out / "checkpoint.json").exists()


def _lamp7_files(tmp_path, users=2, tweets=14):
    """A LaMP-7 split in its published layout: questions with text-only profile items, golds in their own file."""
    import random

    rng = random.Random(7)
    words = [f"w{i}" for i in range(80)]
    questions, golds = [], []
    for u in range(users):
        profile = [
            {"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))), "id": f"7{u}{i:02d}",
             "date": f"2012-01-{i + 1:02d}"}
            for i in range(tweets)
        ]  # fmt: skip
        tweet = " ".join(rng.choice(words) for _ in range(5))
        questions.append({
            "id": f"70{u}", "profile": profile,
            "input": f"Paraphrase the following tweet without any explanation before or after it: {tweet}",
        })  # fmt: skip
        golds.append({"id": f"70{u}", "output": " ".join(rng.choice(words) for _ in range(4))})
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_7", "golds": golds}))
    return tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"


def test_lamp7_preset_tests_only_the_questions_and_renders_history_from_text(tmp_path):
    questions, outputs = _lamp7_files(tmp_path)
    args = bench_args(
        tmp_path, data=str(questions), lamp_outputs=str(outputs), preset="LaMP_7", prompt_template=None,
        methods="copy-input,last-response,base,rag-bm25-accum,spring", min_items=10, learning_rates="1e-2,5e-2",
        epoch_grid="1",
    )  # fmt: skip
    assert args.data_format == "lamp" and args.lamp_queries and args.history_item_template == '"{response}"'
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    bench = ContinualBenchmark(args, model, tokenizer)
    prompts = []
    original = bench._generate

    def spy(rows):
        outputs = original(rows)  # plans the rows: their histories are known after it
        prompts.extend((row.method, row.history) for row in rows)
        return outputs

    bench._generate = spy
    results = bench.run(progress=False)
    tested = {r["test_id"] for r in results["records"]}
    assert tested == {"700", "701"}  # the questions, never a text-only tweet
    copy = [r for r in results["records"] if r["method"] == "copy-input"]
    assert {r["prediction"] for r in copy} == {
        q["input"].split(": ", 1)[1] for q in json.loads(questions.read_text())
    }  # the bare tweet: the LaMP instruction is stripped from the question
    rag_histories = [history for method, history in prompts if method == "rag-bm25-accum"]
    assert rag_histories and all(hit.interaction.metadata.get("text_only") for h in rag_histories for hit in h)
    # Every profile item is text-only, so no validation item exists: the selection is skipped, not run on copies.
    assert results["selection"]["grid"] == [] and results["selection"]["chosen"]["learning_rate"] == 5e-2
    # Each retrieved tweet is written alone, in quotes, without an input; the prompt the model receives holds it.
    from transformers_spring.generation.prompting import render_item

    history = rag_histories[0]
    assert [render_item(hit, args.history_item_template) for hit in history] == [
        f'"{hit.interaction.response}"' for hit in history
    ]
    tok = bench.tokenizer
    ids = HistoryPromptBuilder(tok, SpringConfig(history_item_template=args.history_item_template)).build([], history)
    words = tok.decode(ids).split()  # the word-level test tokenizer reads the quoted first and last words as [UNK]
    for hit in history:
        inner = hit.interaction.response.split()[1:-1]
        assert " ".join(inner) in " ".join(words)


def test_identical_rows_share_one_generation(run, monkeypatch):
    from transformers_spring.evaluation import BenchmarkRow

    bench, _, captured = run
    item = next(r for r, _, _ in captured if r.method == "all-100").item

    def row(method, history):  # the base model (the users' adapters are dropped after the run)
        return BenchmarkRow(method, item, Personalization(user=item.user_id, adapter="__base__", history=history,
                                                          weight=1.0))  # fmt: skip

    rag = next(r for r, _, _ in captured if r.method == "rag-bm25-accum" and r.item.id == item.id)
    first, twin, other = row("a", []), row("b", []), row("c", rag.history)  # the same adapter, history and λ
    sizes, original = [], bench.spring_model.generate

    def counting(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    monkeypatch.setattr(bench.spring_model, "generate", counting)
    out = ContinualBenchmark._generate(bench, [first, twin, other])
    assert sum(sizes) == 2 and out[0] == out[1]


def test_routing_uses_the_right_adapter_chain(run):
    _, _, captured = run
    for row, _, _ in captured:
        spec = METHODS[row.method]
        if spec.is_floor:
            assert row.personalization is None and row.adapter is None  # no model
        elif spec.adapter is None:
            assert row.adapter == "__base__"
        else:
            assert row.adapter == f"{row.item.user_id}__{spec.adapter}", (row.method, row.adapter)
            # SPRInG's chain is the user's own adapter under the wrapper's naming rule: routed by the user id alone.
            assert (row.personalization.adapter is None) == (spec.adapter == "spring"), row.method


def test_histories_respect_time_and_scope(run):
    _, _, captured = run
    from transformers_spring.data import temporal_split

    splits = temporal_split(stream(), num_periods=5, test_fraction=0.1)
    test_ids = {it.id for periods in splits.values() for s in periods for it in s.test}
    for row, _, _ in captured:
        spec = METHODS[row.method]
        for hit in row.history:
            assert hit.interaction.id not in test_ids  # never a test item
            if hit.source == "global":
                assert hit.interaction.user_id != row.item.user_id
                assert hit.interaction.timestamp < row.item.timestamp
            else:
                assert hit.interaction.user_id == row.item.user_id
        if spec.scope == "accum":
            assert len(row.history) == 4  # rag_k: at least 4 training items exist from period 0 on
        if spec.scope == "each":
            assert len(row.history) == 3  # the period's 3 training items


def test_rag_each_reads_only_the_current_period(run):
    from transformers_spring.data import temporal_split

    _, results, captured = run
    splits = temporal_split(stream(), num_periods=5, test_fraction=0.1)
    for row, _, _ in captured:
        if row.method != "rag-bm25-each":
            continue
        periods = splits[row.item.user_id]
        own = {it.id for s in periods for it in s.train}
        assert {hit.interaction.id for hit in row.history} <= own
        # Each history is exactly one period's training split (the evaluated one, or the last for forgetting).
        assert any({hit.interaction.id for hit in row.history} == {it.id for it in s.train} for s in periods[1:])


def test_spring_gate_filters_buffer_items_below_sigma(run):
    bench, results, captured = run
    assert math.isfinite(results["gate_sigma"])
    gated = [row for row, _, _ in captured if row.method == "spring"]
    ungated = [row for row, _, _ in captured if row.method == "spring-nogate"]
    # σ is computed from training queries seen so far, so it moves; each row records the one it was gated with.
    assert all(row.gate_threshold is not None for row in gated)
    assert all(hit.score > row.gate_threshold for row in gated for hit in row.history)
    assert all(row.gate_threshold is None for row in ungated)
    assert sum(len(r.history) for r in ungated) >= sum(len(r.history) for r in gated)
    assert any(r.history for r in ungated)


def test_save_results_writes_json_table_and_plot(run, tmp_path):
    _, results, _ = run
    paths = save_results(results, tmp_path / "saved")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["summary"].keys() == results["summary"].keys()
    table = paths["markdown"].read_text()
    assert "| SPRInG |" in table and "**" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "lamp", "results.json", "results.md", "rouge_l_per_period.png"
    ]  # fmt: skip
    golds = json.loads((tmp_path / "saved" / "lamp" / "golds.json").read_text())
    preds = json.loads((tmp_path / "saved" / "lamp" / "spring.json").read_text())
    assert golds["task"] == preds["task"] == "LaMP_4"
    assert sorted(g["id"] for g in golds["golds"]) == sorted(p["id"] for p in preds["golds"])
    assert len(golds["golds"]) == 8
    assert "Paired bootstrap" in table and "NLL" in table
    assert markdown_table(loaded).splitlines()[2:] == table.splitlines()[2:]  # JSON round trip (str period keys)


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        bench_args(tmp_path, methods="base,sprung")
    with pytest.raises(ValueError, match="`num_periods`"):
        bench_args(tmp_path, num_periods=1)
    with pytest.raises(ValueError, match="`prompt_template`"):
        bench_args(tmp_path, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="`data_format`"):
        bench_args(tmp_path, data_format="csv")
    with pytest.raises(ValueError, match="`tune_grid`: unknown option 'lr'; known: learning_rates, epochs"):
        bench_args(tmp_path, tune_grid='{"lr": "1e-3"}')
    with pytest.raises(ValueError, match="`tune_grid`: `learning_rates`"):
        bench_args(tmp_path, tune_grid='{"learning_rates": "fast"}')
    with pytest.raises(ValueError, match="`tune_grid` must be a JSON object"):
        bench_args(tmp_path, tune_grid='["learning_rates"]')
    with pytest.raises(ValueError, match="`tune_max_cost`"):
        bench_args(tmp_path, tune_max_cost=0)
    with pytest.raises(FileNotFoundError, match="`data`"):
        ContinualBenchmark(bench_args(tmp_path, data=str(tmp_path / "missing.jsonl"))).run(progress=False)
    assert [m.name for m in resolve_methods("base, spring")] == ["base", "spring"]


def test_load_interactions_detects_the_format(tmp_path):
    from transformers_spring.data import write_interactions_jsonl
    from transformers_spring.evaluation import load_interactions

    news = tmp_path / "news.jsonl"
    row = {"link": "l", "headline": "Cats Win", "category": "C", "short_description": "Cats won.", "authors": "Ann",
           "date": "2022-01-02"}  # fmt: skip
    news.write_text(json.dumps(row) + "\n")
    (item,) = load_interactions(bench_args(tmp_path, data=str(news)))
    assert (item.user_id, item.prompt, item.response) == ("Ann", "Cats won.", "Cats Win")

    stream_path = tmp_path / "stream.jsonl"
    write_interactions_jsonl(make_interactions("alice", 3), stream_path)
    assert [it.id for it in load_interactions(bench_args(tmp_path, data=str(stream_path)))] == [
        "alice-0", "alice-1", "alice-2"
    ]  # fmt: skip

    lamp = tmp_path / "questions.json"
    profile = [{"id": "p1", "text": "Cats won.", "title": "Cats Win", "date": "2022-01-02"}]
    lamp.write_text(json.dumps([{"id": "q1", "input": "x", "profile": profile}]))
    (item,) = load_interactions(bench_args(tmp_path, data=str(lamp), lamp_task="LaMP_4"))
    assert (item.prompt, item.response) == ("Cats won.", "Cats Win")

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="first line is not a JSON object"):
        load_interactions(bench_args(tmp_path, data=str(bad)))


def test_line_end_criteria_stops_after_the_first_visible_line():
    from transformers_spring.evaluation.decoding import LineEndCriteria

    # ids: 0 "a", 1 "\n", 2 "b\n", 3 " "; per id: holds a line break / visible text before it / visible at all
    tokens = (torch.tensor([False, True, True, False]), torch.tensor([False, False, True, False]),
              torch.tensor([True, False, True, False]))  # fmt: skip
    criteria = LineEndCriteria(tokens)
    steps = [[1, 1], [0, 2], [1, 3]]  # row 0: "\n" "a" "\n"; row 1: "\n" "b\n" " "
    seen = [criteria(torch.tensor([step]).T, None).tolist() for step in steps]
    assert seen == [[False, False], [False, True], [True, False]]  # a leading newline never stops a row


def test_results_equal_those_of_the_recorded_release(run):
    """The benchmark measures what it did before its rows went through the user's pipeline: every prediction, history
    size and NLL equals what release 0.1 recorded on this tiny run (`tests/fixtures/make_bench_records.py`)."""
    from pathlib import Path

    _, results, _ = run
    recorded = json.loads((Path(__file__).parents[1] / "fixtures/saved_by_0_1/bench_records.json").read_text())
    assert results["selection"]["chosen"] == recorded["selection"]
    assert len(results["records"]) == len(recorded["records"])
    for record, old in zip(results["records"], recorded["records"], strict=True):
        for key in ("method", "user", "period", "phase", "test_id", "prediction", "history_items"):
            assert record[key] == old[key], (key, old["method"], old["test_id"])
        if old["nll"] is None:
            assert record["nll"] is None
        else:
            assert record["nll"] == pytest.approx(old["nll"], abs=1e-5), (old["method"], old["test_id"])


# ---------------------------------------------------------------------------------------------------- spring-tuned
def tuned_user_call(bench, row):
    """A spring-tuned row as a user decodes it: a fresh wrapper with the tuned config over the benchmark's model and
    spring-tuned's memory, one prompt alone, `Personalization(user, query, gate=σ)`."""
    tok = bench.tokenizer
    spring = SpringForCausalLM(bench.peft_model, memory=bench.tuned_memory, config=bench.tuned_model.spring_config,
                               tokenizer=tok)  # fmt: skip
    inputs = tok([bench._formatter.prompt_text(row.item)], return_tensors="pt", add_special_tokens=False)
    personalization = Personalization(user=row.item.user_id, query=row.item.prompt, gate=row.gate_threshold)
    with torch.no_grad():
        out = spring.generate(**inputs, personalization=personalization, max_new_tokens=bench._budget,
                              do_sample=False, repetition_penalty=1.2, pad_token_id=tok.pad_token_id)  # fmt: skip
    from transformers_spring.evaluation.decoding import first_line

    return first_line(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tuned")
    args = bench_args(tmp_path, methods="base,spring,spring-tuned", tune_grid=TUNE_GRID)
    bench = ContinualBenchmark(args, *tiny(), stream())
    captured, adapters_after_search = [], []
    original_generate, original_setup = bench._generate, bench._setup_tuned

    def spy(rows):
        outputs = original_generate(rows)
        wrapper_rows = [p for p in bench.tuned_model.last_personalization if p is not None]
        for row, text in zip(rows, outputs, strict=True):
            reference = tuned_user_call(bench, row) if row.method == "spring-tuned" else None
            captured.append((row, text, reference, wrapper_rows))
        return outputs

    def setup(*a):
        adapters_after_search.append(sorted(bench.peft_model.peft_config))
        return original_setup(*a)

    bench._generate, bench._setup_tuned = spy, setup
    results = bench.run(progress=False)
    return bench, results, captured, adapters_after_search


def test_spring_tuned_runs_and_reports_its_choice_and_cost(tuned):
    bench, results, _, adapters_after_search = tuned
    records = [r for r in results["records"] if r["method"] == "spring-tuned"]
    assert len(records) == 2 * 4 + 2 and all(r["nll"] is not None and math.isfinite(r["nll"]) for r in records)
    assert "spring-tuned" in results["summary"] and results["methods"][-1] == "spring-tuned"
    tuning = results["tuning"]
    options = tuning["options"]
    assert options["learning_rate"] in (1e-2, 5e-2) and options["selection_ratio"] in (0.5, 1.0)
    assert options["interpolation_weight"] == 0.5 and options["gate"] == "quantile"
    assert options["retrieval_region"] == "history"
    cost = tuning["cost"]
    assert cost["seconds"] > 0 and cost["samples"] > 0 and 0 < cost["ratio"] <= bench.args.tune_max_cost
    assert tuning["trials"] and tuning["validation"]["users"] and tuning["chain"].startswith("its own")
    assert results["timing_s"]["tuning"] > 0 and results["timing_s"]["train_tuned"] > 0
    # The search leaves the shared model as it found it: the anchor alone (no candidate adapter, no second wrapping).
    assert adapters_after_search == [["bench_anchor"]]
    assert list(bench.peft_model.peft_config) == ["bench_anchor"]
    assert bench.tuned_model.spring_config.adapter_name_template == "{user_id}__tuned"
    for key, value in tuning["spring_config"].items():  # the wrapper decodes with every chosen setting
        assert getattr(bench.tuned_model.spring_config, key) == value, key


def test_spring_tuned_rows_are_a_users_call_to_their_own_wrapper(tuned):
    from transformers_spring.data import temporal_split

    _, _, captured, _ = tuned
    splits = temporal_split(stream(), num_periods=5, test_fraction=0.1)
    rows = [
        (row, text, reference, planned) for row, text, reference, planned in captured if row.method == "spring-tuned"
    ]
    assert len(rows) == 10
    for index, (row, text, reference, planned) in enumerate(rows):
        user = row.item.user_id
        personalization = row.personalization
        assert (personalization.user, personalization.query) == (user, row.item.prompt)
        assert personalization.adapter is None and personalization.history is None and personalization.weight is None
        assert row.adapter == f"{user}__tuned" and [p.adapter for p in planned] == [f"{user}__tuned"]
        assert text == reference  # what the user's own call generates
        # σ is pooled from training queries, and every kept item is above it.
        assert row.gate_threshold is not None
        assert all(hit.score > row.gate_threshold for hit in row.history)
        # The history region holds the user's training items up to the state's period: never a test item, never a
        # later period's item (per user: periods 1-4, then period 1 again under the final state).
        periods = splits[user]
        state = index % 5 + 1 if index % 5 < 4 else 4
        allowed = {it.id for s in periods[: state + 1] for it in s.train}
        assert row.item in periods[index % 5 + 1 if index % 5 < 4 else 1].test
        assert {hit.interaction.id for hit in row.history} <= allowed, (row.item.id, state)
    assert any(row.history for row, *_ in rows)


def test_spring_tuned_with_springs_own_settings_reproduces_spring(tmp_path):
    """With SPRInG's training and decoding settings as the only grid point, spring-tuned's chain copies SPRInG's
    adapter and buffer after each period (no second training) and its rows equal SPRInG's: predictions, NLLs, σ."""
    grid = json.dumps({
        "learning_rates": "5e-2", "epochs": "1", "selections": "drift0.3", "interpolation_weights": "0.5",
        "gates": "q0.75", "top_ks": "2", "regions": "buffer", "copy_weights": "0", "adaptive_weights": "0",
    })  # fmt: skip
    bench = ContinualBenchmark(bench_args(tmp_path, methods="spring,spring-tuned", tune_grid=grid), *tiny(), stream())
    names, original = [], bench._train

    def train(train_args, user, period, batch, name, memory=None):
        names.append(name)
        return original(train_args, user, period, batch, name, memory)

    bench._train = train
    results = bench.run(progress=False)
    assert names and not any(name.endswith("__tuned") for name in names)
    assert results["tuning"]["chain"].startswith("SPRInG's")
    records = {(r["method"], r["test_id"], r["phase"]): r for r in results["records"]}
    tuned = [r for r in results["records"] if r["method"] == "spring-tuned"]
    assert len(tuned) == 10 and any(r["history_items"] for r in tuned)
    for r in tuned:
        spring = records[("spring", r["test_id"], r["phase"])]
        assert r["prediction"] == spring["prediction"] and r["history_items"] == spring["history_items"]
        assert r["nll"] == pytest.approx(spring["nll"], abs=1e-5)
        assert r["gate_threshold"] == pytest.approx(spring["gate_threshold"])
    assert results["tuning"]["gate_sigma"] == pytest.approx(results["gate_sigma"])


def test_tuning_settings_are_part_of_the_checkpoint_fingerprint(tmp_path):
    from transformers_spring.evaluation.checkpoint import fingerprint, settings_match

    args = bench_args(tmp_path, tune_grid=TUNE_GRID, tune_max_cost=2.0)
    saved = fingerprint(args)
    assert saved["tune_grid"] == TUNE_GRID and saved["tune_max_cost"] == 2.0
    assert settings_match(saved, args)
    assert not settings_match(saved, bench_args(tmp_path, tune_grid=TUNE_GRID, tune_max_cost=3.0))
    assert not settings_match(saved, bench_args(tmp_path, tune_max_cost=2.0))
