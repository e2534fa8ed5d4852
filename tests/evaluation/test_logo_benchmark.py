"""The LoGo study on tiny models: history cuts, arms and their adapters, NLL against `score`, validation only,
cross-fitted community adapters and the checkpoint."""

import json

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_interactions, make_model, make_tokenizer

from transformers_spring.evaluation import (
    LoGoBenchmark,
    LoGoBenchmarkArguments,
    benchmark_splits,
    logo_markdown,
    save_logo_results,
)
from transformers_spring.evaluation.logo_benchmark import BOTH, COMMUNITY, CONSENTED, LOCAL
from transformers_spring.records import Interaction

TEMPLATE = "write a headline for {prompt}"
USERS = ("alice", "bob", "carol", "dave")


def logo_args(tmp_path, **kwargs):
    defaults = dict(
        users=len(USERS), min_items=10, max_items=0, prompt_template=TEMPLATE, max_new_tokens=3,
        generation_batch_size=2, encoder="hashing", learning_rate=5e-2, num_train_epochs=1, learning_rates="",
        history_cuts="0,1,3,all", min_community_users=1, community_min_users=1, mediator_min_examples=2,
        out=str(tmp_path / "out"),
    )  # fmt: skip
    defaults.update(kwargs)
    return LoGoBenchmarkArguments(**defaults)


def stream():
    items = []
    for seed, user in enumerate(USERS):
        for i, it in enumerate(make_interactions(user, 20, seed=seed + 1)):
            category = "rare" if i == 19 else "main"  # the last (a test item) is a topic the user rarely writes on
            items.append(Interaction(it.user_id, it.prompt, it.response, timestamp=it.timestamp + seed / 10,
                                     id=it.id, metadata={"category": category}))  # fmt: skip
    return sorted(items, key=lambda it: it.timestamp)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("logo")
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    bench = LoGoBenchmark(logo_args(tmp_path), model, tokenizer, stream())
    events, captured = [], []
    original_generate, original_fit = bench._generate, None

    def spy(rows):
        user = rows[0].item.user_id
        outputs = original_generate(rows)
        for row in rows:
            targets = bench._formatter.encode(row.item)
            prompt = bench.tokenizer(bench._formatter.prompt_text(row.item), return_tensors="pt",
                                     add_special_tokens=False)  # fmt: skip
            logprobs = bench.spring_model.score(
                prompt["input_ids"],
                [list(targets.input_ids[targets.prompt_length :])],
                prompt["attention_mask"],
                personalization=row.personalization,
            )[0]
            captured.append((row, float(-logprobs.mean()), len(bench.memory.history(user))))
        events.append("test")
        return outputs

    bench._generate = spy
    from transformers_spring.memory import mediator as mediator_module

    original_fit = mediator_module.CalibratedMediator.fit.__func__

    def fit_spy(cls, *args, **kwargs):
        events.append("fit")
        return original_fit(cls, *args, **kwargs)

    mediator_module.CalibratedMediator.fit = classmethod(fit_spy)
    try:
        results = bench.run(progress=False)
    finally:
        mediator_module.CalibratedMediator.fit = classmethod(original_fit)
    return bench, results, captured, events, tmp_path


def test_every_test_item_is_decoded_under_every_cut_and_arm(run):
    bench, results, *_ = run
    tests = {
        it.id
        for periods in benchmark_splits(bench.args, bench.interactions).values()
        for p in periods[1:]
        for it in p.test
    }
    for cut in (0, 1, 3, "all"):
        for method in (LOCAL, CONSENTED, COMMUNITY, BOTH):
            got = {r["test_id"] for r in results["records"] if r["cut"] == cut and r["method"] == method}
            assert got == tests, (cut, method)


def test_nll_equals_score_of_the_decoded_row(run):
    _, results, captured, *_ = run
    by_key = {(r["method"], r["test_id"], str(r["cut"])): r for r in results["records"]}
    seen = 0
    for row, nll, n_local in captured:
        cut = "all" if n_local > 3 else str(n_local)
        record = by_key[(row.method, row.item.id, cut)]
        assert record["nll"] == pytest.approx(nll, abs=1e-5)
        seen += 1
    assert seen == len(results["records"])


def test_cut_histories_hold_only_the_first_m_items_and_the_arms_share_their_adapters(run):
    bench, results, captured, *_ = run
    for row, _, n_local in captured:
        assert n_local in (0, 1, 3) or n_local > 3
        assert all(hit.source == "global" or hit.interaction.user_id == row.item.user_id for hit in row.history)
        local = [hit for hit in row.history if hit.source == "local"]
        assert all(hit.interaction.timestamp < row.item.timestamp for hit in row.history)
        if n_local == 0:
            assert not local
            assert row.adapter == "__base__"  # no item: the base model, as SpringForCausalLM decodes such a user
        if row.method in (LOCAL, COMMUNITY):
            assert not any(hit.source == "global" for hit in row.history)
    # LOCAL and CONSENTED decode with the user's adapter, COMMUNITY and BOTH with the community-started one.
    adapters = {}
    for row, _, n_local in captured:
        kind = "local" if row.method in (LOCAL, CONSENTED) else "community"
        adapters.setdefault((row.item.id, n_local, kind), set()).add(row.adapter)
    assert all(len(names) == 1 for names in adapters.values())
    differ = [
        key for key, names in adapters.items() if key[2] == "local" and names != adapters[(*key[:2], "community")]
    ]
    assert differ  # the community arms do decode with other adapters


def test_community_adapters_are_cross_fitted(run):
    bench, results, captured, *_ = run
    users = list(bench._fold)
    assert {bench._fold[u] for u in users} == {0, 1} and set(results["communities"]) == {"0", "1"}
    started = [r for r in results["records"] if r["method"] in (COMMUNITY, BOTH) and r["community"] is not None]
    assert started  # the community arms' adapters started from a community adapter ...
    for r in started:  # ... trained on the other fold's users only
        table = bench._communities[bench._fold[r["user"]]]
        assert r["community"] in table.names and r["user"] not in table[r["community"]].members
        assert r["adapter"].endswith("__cutc")
    assert all(r["community"] is None for r in results["records"] if r["method"] in (LOCAL, CONSENTED))


def test_mediators_are_fitted_on_validation_queries_before_any_test_item(run):
    bench, results, _, events, _ = run
    assert events.index("fit") < events.index("test") and events.count("fit") == 2  # CONSENTED and BOTH
    tests = {
        it.id
        for periods in benchmark_splits(bench.args, bench.interactions).values()
        for p in periods
        for it in p.test
    }
    assert results["validation"]["ids"] and not set(results["validation"]["ids"]) & tests
    assert set(results["mediators"]) == {CONSENTED, BOTH}
    assert results["validation"]["queries"][CONSENTED] > 0
    # The late fold (the last period's latest training items) puts warm users in the fit.
    splits = benchmark_splits(bench.args, bench.interactions)
    late = {it.id for periods in splits.values() for it in periods[-1].train}
    assert results["validation"]["late_ids"] and set(results["validation"]["late_ids"]) <= late
    assert set(results["validation"]["late_ids"]) <= set(results["validation"]["ids"])
    warm = min(r["n_local"] for r in results["records"] if r["cut"] == "all")
    assert results["validation"]["max_n_local"] >= warm
    # "*" is never fitted: a cell validation did not cover keeps the local decision.
    for arm in (CONSENTED, BOTH):
        assert results["mediators"][arm]["rules"]["*"] == [0, bench.args.interpolation_weight]


def test_summary_buckets_and_bias_flag(run):
    _, results, *_ = run
    summary = results["summary"]
    assert {"m=0", "m=1", "m=3", "m=all", "cold", "warm", "bias"} <= set(summary)
    # Items, not (item, cut) rows: the pooled cold bucket averages an item's cuts first, as its bootstrap does.
    assert summary["cold"][LOCAL]["n"] == summary["m=0"][LOCAL]["n"] == summary["m=all"][LOCAL]["n"]
    cold_rows = [r for r in results["records"] if r["method"] == LOCAL and r["cut"] != "all"]
    by_item = {}
    for r in cold_rows:
        by_item.setdefault(r["test_id"], []).append(r["nll"])
    expected = sum(sum(v) / len(v) for v in by_item.values()) / len(by_item)
    assert summary["cold"][LOCAL]["nll"] == pytest.approx(expected)
    assert list(summary)[:4] == ["m=0", "m=1", "m=3", "m=all"]
    diff = summary["cold"][f"{CONSENTED} - spring-local"]["nll"]
    assert diff["n"] == summary["m=0"][LOCAL]["n"]  # one value per test item, not per (item, cut)
    rare = [r for r in results["records"] if r["cut"] == "all" and r["category"] == "rare"]
    assert rare and all(r["bias"] for r in rare)
    assert not any(r["bias"] for r in results["records"] if r["category"] == "main" or r["cut"] != "all")


def test_results_are_saved_with_table_and_plot(run):
    _, results, _, _, tmp_path = run
    paths = save_logo_results(results, tmp_path / "saved")
    assert json.loads(paths["json"].read_text())["records"]
    text = paths["markdown"].read_text()
    assert "SPRInG + consented retrieval" in text and "SPRInG + community adapter" in text
    assert "Δ NLL" in logo_markdown(results) and "Sharing policy: consented" in text
    assert paths["plot"] is None or paths["plot"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"history_cuts": "0,x"}, "history_cuts"),
        ({"history_cuts": ""}, "history_cuts"),
        ({"mediator_weights": "0,2"}, "mediator_weights"),
        ({"arms": "consented,open"}, "arms"),
        ({"arms": ""}, "arms"),
        ({"community_min_users": 0}, "community_min_users"),
        ({"mediator_min_examples": 1}, "mediator_min_examples"),
        ({"retrieval_region": "everywhere"}, "retrieval_region"),
        ({"gate": "auto"}, "gate"),
        ({"bias_rare_share": 1.5}, "bias_rare_share"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        logo_args(tmp_path, **kwargs)


def test_the_study_needs_its_own_arguments(tmp_path):
    from transformers_spring.evaluation import BenchmarkArguments

    with pytest.raises(TypeError, match="LoGoBenchmarkArguments"):
        LoGoBenchmark(BenchmarkArguments(encoder="hashing"), model=torch.nn.Module())


@pytest.mark.parametrize("phase", ["_validate_user", "_test_user"])
def test_a_stopped_study_resumes_from_its_checkpoint_with_the_same_results(tmp_path, phase):
    """A run stopped after its first user's validation or test pass continues from the checkpoint: the records equal
    an uninterrupted run's, and the finished users are not done again."""
    from transformers_spring.evaluation.checkpoint import save_checkpoint  # noqa: F401 (the file format)

    def bench(**kwargs):
        model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
        args = logo_args(tmp_path, history_cuts="0,all", arms="consented,community", **kwargs)
        return LoGoBenchmark(args, model, tokenizer, stream())

    whole = bench().run(progress=False)
    checkpoint = tmp_path / "logo_checkpoint.json"
    stopped = bench()
    original, calls = getattr(stopped, phase), []

    def stop_after_one(user, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(user)
        return original(user, *args)

    setattr(stopped, phase, stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        stopped.run(progress=False, checkpoint=checkpoint)
    saved = json.loads(checkpoint.read_text())
    assert saved["validated" if phase == "_validate_user" else "done"] == calls and "gate_sigma" in saved
    assert (tmp_path / "logo_communities" / "fold-0" / "community_adapters.json").is_file()
    resumed_bench = bench()
    resumed_bench._train_communities = lambda *a: pytest.fail("the saved community adapters are loaded, not retrained")
    decoded = []
    original_resumed = getattr(resumed_bench, phase)
    setattr(resumed_bench, phase, lambda user, *args: decoded.append(user) or original_resumed(user, *args))
    resumed = resumed_bench.run(progress=False, checkpoint=checkpoint)
    assert resumed["resumed"] and calls[0] not in decoded
    key = lambda r: (r["method"], r["user"], r["test_id"], str(r["cut"]))  # noqa: E731
    left = {key(r): (r["prediction"], round(r["nll"], 5)) for r in whole["records"]}
    right = {key(r): (r["prediction"], round(r["nll"], 5)) for r in resumed["records"]}
    assert left == right
