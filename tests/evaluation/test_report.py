"""`summarize`, the bootstrap tables, `markdown_table` and `plot_rouge_l` on hand-written records and results."""

import json
import math

import pytest

from transformers_spring.evaluation import drift_bootstrap, markdown_table, summarize
from transformers_spring.evaluation.metrics import paired_bootstrap
from transformers_spring.evaluation.report import (
    HEAVY_MIN_ITEMS,
    _verdict,
    drift_bootstrap_heavy,
    heavy_users,
    merge_results,
    plot_rouge_l,
    rebuild_report,
)


def scores(r1, rl, n=2):
    return {"rouge1": r1, "rougeL": rl, "n": n}


def results():
    def summary(p0, p1, forgetting, nll=math.nan):
        return {
            "periods": {0: scores(*p0), 1: scores(*p1)},
            "average": {
                "rouge1": (p0[0] + p1[0]) / 2,
                "rougeL": (p0[1] + p1[1]) / 2,
                "rougeL_stemmed": p1[1],
                "nll": nll,
            },  # fmt: skip
            "forgetting": {"rougeL": forgetting, "n": 2},
            "cold_start": scores(0.1, 0.2, 1),
            "warm": scores(0.3, 0.4, 3),
        }

    return {
        "summary": {
            "base": summary((0.1, 0.1), (0.2, 0.2), math.nan, 3.5),
            "spring": summary((0.3, 0.25), (0.4, 0.35), 0.05, 3.0),
            "my-method": summary((0.0, 0.0), (0.0, 0.0), 0.0),
        },
        "bootstrap": {
            "base": {
                "rougeL": {"mean": 0.15, "low": 0.1, "high": 0.2, "n": 4},
                "nll": {"mean": -0.5, "low": -0.7, "high": -0.3, "n": 4},
            },
            "my-method": {
                "rougeL": {"mean": 0.3, "low": 0.2, "high": 0.4, "n": 4},
                "nll": {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0},
            },
        },  # fmt: skip
        "users": {"alice": {}, "bob": {}},
        "config": {"model": "tiny"},
    }


def test_markdown_table_rows_labels_and_best():
    table = markdown_table(results())
    lines = table.splitlines()
    assert lines[0] == ("| Method | P0 R-1 | P0 R-L | P1 R-1 | P1 R-L | Avg R-1 | Avg R-L | Avg R-L stem | NLL |")
    assert lines[2] == "| Base | 0.1000 | 0.1000 | 0.2000 | 0.2000 | 0.1500 | 0.1500 | 0.2000 | 3.5000 |"
    # the best average R-L and the lowest NLL in bold
    assert lines[3] == "| SPRInG | 0.3000 | 0.2500 | 0.4000 | 0.3500 | 0.3500 | **0.3000** | 0.3500 | **3.0000** |"
    assert lines[4].startswith("| my-method |") and lines[4].endswith("| – |")  # unknown id kept; no NLL: a dash
    assert any("Test items per period: P0 2, P1 2." in line for line in lines)
    assert "| Base | – | 0.2000 (1) | 0.4000 (3) |" in lines  # NaN forgetting is a dash
    assert "| SPRInG | 0.0500 | 0.2000 (1) | 0.4000 (3) |" in lines
    assert table.count("**") == 4
    assert "| Base | +0.1500 [+0.1000, +0.2000] (n=4) | -0.5000 [-0.7000, -0.3000] (n=4) |" in lines
    assert "| my-method | +0.3000 [+0.2000, +0.4000] (n=4) | – |" in lines


def test_markdown_table_reads_json_round_tripped_results():
    loaded = json.loads(json.dumps(results()))  # period keys become strings
    assert markdown_table(loaded) == markdown_table(results())


def test_plot_rouge_l_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_rouge_l(results(), tmp_path / "rouge.png")
    assert path == tmp_path / "rouge.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["rouge.png"]  # written atomically, nothing left behind


def test_summary_matches_a_hand_computation():
    records = [
        {"method": "m", "user": "a", "period": 1, "phase": "period", "test_id": "x", "n_train": 3,
         "rouge1": 0.5, "rougeL": 0.4, "rougeL_stemmed": 0.5, "nll": 2.0},
        {"method": "m", "user": "b", "period": 1, "phase": "period", "test_id": "y", "n_train": 9,
         "rouge1": 0.1, "rougeL": 0.2, "rougeL_stemmed": 0.2, "nll": 4.0},
        {"method": "m", "user": "a", "period": 2, "phase": "period", "test_id": "z", "n_train": 3,
         "rouge1": 0.3, "rougeL": 0.3, "rougeL_stemmed": 0.3, "nll": None},
        {"method": "m", "user": "a", "period": 1, "phase": "forgetting", "test_id": "x", "n_train": 3,
         "rouge1": 0.2, "rougeL": 0.1, "rougeL_stemmed": 0.1, "nll": 5.0},
    ]  # fmt: skip
    s = summarize(records, ["m"], num_periods=3, cold_start_max_train=5)["m"]
    assert s["periods"][1]["rougeL"] == pytest.approx(0.3) and s["periods"][1]["n"] == 2
    assert s["periods"][2]["rougeL"] == pytest.approx(0.3)
    assert s["average"]["rougeL"] == pytest.approx(0.3)  # mean of the period means
    assert s["average"]["rouge1"] == pytest.approx((0.3 + 0.3) / 2)
    assert s["forgetting"]["rougeL"] == pytest.approx(0.4 - 0.1) and s["forgetting"]["n"] == 1
    assert s["cold_start"]["rougeL"] == pytest.approx(0.35) and s["cold_start"]["n"] == 2
    assert s["warm"]["n"] == 1
    assert s["periods"][1]["nll"] == pytest.approx(3.0) and math.isnan(s["periods"][2]["nll"])  # no NLL: NaN
    assert s["forgetting"]["nll"] == pytest.approx(2.0 - 5.0)


def test_drift_bootstrap_compares_the_top30_adapter_with_random_and_all_at_lambda0():
    records = []
    for i in range(6):
        for method, nll, rouge in (("spring-lambda0", 2.0 + 0.1 * i, 0.3), ("spring-random30", 2.5, 0.2),
                                   ("all-100", 2.0 + 0.1 * i, 0.3), ("base", 9.0, 0.0)):  # fmt: skip
            records.append({"method": method, "user": "u", "period": 1, "phase": "period", "test_id": str(i),
                            "rougeL": rouge, "nll": nll})  # fmt: skip
    methods = ["base", "spring-lambda0", "spring-random30", "all-100"]
    table = drift_bootstrap(records, methods)
    assert list(table) == ["spring-random30", "all-100"]  # base is not part of the drift question
    expected = paired_bootstrap([2.0 + 0.1 * i for i in range(6)], [2.5] * 6)
    assert table["spring-random30"]["nll"] == expected
    assert table["all-100"]["nll"]["mean"] == pytest.approx(0.0) and table["all-100"]["rougeL"]["n"] == 6
    assert drift_bootstrap(records, ["base", "spring-lambda0"]) == {}
    assert "Drift selection at λ = 0" in markdown_table({**results(), "drift_bootstrap": table})


def heavy_results(counts):
    """A run with one user per entry of `counts` (items per period over two periods, train + test 9:1) and three
    test items per user in period 1, scored by the top-30 % adapter, both ablations and Base. Random-30 %'s NLL
    grows with the user's index, so leaving a user out changes the table."""
    users, records = {}, []
    for u, per_period in enumerate(counts):
        name = f"user{u}"
        users[name] = [{"train": per_period - per_period // 10, "test": per_period // 10} for _ in range(2)]
        for i in range(3):
            for method, nll, rouge in (("spring-lambda0", 3.0 + 0.1 * i, 0.2), ("spring-random30", 2.5 + 0.1 * u, 0.1),
                                       ("all-100", 2.8 + 0.05 * i, 0.25), ("base", 9.0, 0.0)):  # fmt: skip
                records.append({"method": method, "user": name, "period": 1, "phase": "period", "test_id": str(i),
                                "n_train": 5, "rouge1": rouge, "rougeL": rouge, "rougeL_stemmed": rouge,
                                "nll": nll})  # fmt: skip
    methods = ["base", "spring-lambda0", "spring-random30", "all-100"]
    return {"config": {"num_periods": 2}, "methods": methods, "users": users, "records": records}


def test_heavy_users_sum_train_and_test_over_periods_and_the_threshold_is_inclusive():
    users = {
        "light": [{"train": 70, "test": 4}, {"train": 70, "test": 5}],  # 149: one short
        "edge": [{"train": 70, "test": 5}, {"train": 70, "test": 5}],  # exactly 150
        "heavy": {"0": {"train": 300, "test": 30}},  # periods keyed by number are read too
    }
    assert HEAVY_MIN_ITEMS == 150
    assert heavy_users(users) == {"heavy": 330, "edge": 150}  # heaviest first
    assert list(heavy_users(users, heavy_min_items=149)) == ["heavy", "edge", "light"]
    assert heavy_users(users, heavy_min_items=151) == {"heavy": 330}
    assert heavy_users({}) == {} and heavy_users(None) == {}


def test_drift_bootstrap_heavy_is_drift_bootstrap_on_the_heavy_users_records():
    results = heavy_results([100, 40, 75])  # two periods each: 200, 80 and 150 items
    heavy = drift_bootstrap_heavy(results)
    assert heavy["min_items"] == 150 and heavy["users"] == ["user0", "user2"]
    assert heavy["user_items"] == {"user0": 200, "user2": 150} and heavy["test_items"] == 6
    kept = [r for r in results["records"] if r["user"] in ("user0", "user2")]
    by_hand = drift_bootstrap(kept, results["methods"])
    assert {k: heavy[k] for k in by_hand} == by_hand and set(heavy) - set(by_hand) == {
        "min_items", "users", "user_items", "test_items", "means"
    }  # fmt: skip
    assert by_hand != drift_bootstrap(results["records"], results["methods"])  # the light user was left out
    assert heavy["spring-random30"]["nll"]["n"] == 6
    means = heavy["means"]
    assert list(means) == ["spring-lambda0", "spring-random30", "all-100"]  # not base
    assert means["spring-lambda0"]["nll"] == pytest.approx(3.1) and means["spring-lambda0"]["n"] == 6
    assert means["spring-random30"]["nll"] == pytest.approx(2.6)  # users 0 and 2: 2.5 and 2.7
    assert means["all-100"]["rougeL"] == pytest.approx(0.25)
    assert drift_bootstrap_heavy(results, heavy_min_items=201)["users"] == []

    rebuilt = rebuild_report(results)
    assert rebuilt["drift_bootstrap_heavy"] == heavy
    assert rebuild_report(results, heavy_min_items=80)["drift_bootstrap_heavy"]["users"] == ["user0", "user2", "user1"]
    table = markdown_table(rebuilt)
    assert "### The paper's regime: heavy authors (>= 150 items)" in table
    assert "user0 (200), user2 (150); 6 test items." in table
    assert "| SPRInG λ=0 | 3.1000 | 0.2000 | 6 |" in table
    # random is always more likely and all-100 too: an interval wholly above zero is "worse"; ROUGE-L favours
    # the top-30 % over random and All-100 % over it
    assert (
        "against Random-30 % (λ=0): worse by NLL, better by ROUGE-L; against All-100 %: worse by NLL, worse by "
        in table
    )
    assert markdown_table(json.loads(json.dumps(rebuilt))) == table  # survives results.json


def test_no_heavy_users_gives_an_empty_list_and_no_table():
    results = heavy_results([20, 30])
    heavy = drift_bootstrap_heavy(results)
    assert heavy == {"min_items": 150, "users": [], "user_items": {}}
    assert drift_bootstrap_heavy({"records": [], "methods": []}) == heavy  # no `users` at all
    rebuilt = rebuild_report(results)
    assert rebuilt["drift_bootstrap_heavy"]["users"] == []
    assert "No author has at least 150 items" in markdown_table(rebuilt)
    # heavy users but no drift ablations in the run: means of what is there, no paired table, no crash
    lonely = {**heavy_results([100]), "methods": ["base", "spring-lambda0"]}
    heavy = drift_bootstrap_heavy(lonely)
    assert heavy["users"] == ["user0"] and list(heavy["means"]) == ["spring-lambda0"]
    assert "spring-random30" not in heavy and "all-100" not in heavy
    assert "heavy authors" not in markdown_table(rebuild_report(lonely))  # shown beside the drift table only


def test_the_verdict_needs_an_interval_wholly_on_one_side_of_zero():
    def stat(low, high, n=5):
        return {"mean": (low + high) / 2, "low": low, "high": high, "n": n}

    assert _verdict(stat(-0.2, -0.1), lower_is_better=True) == "better"  # NLL: top-30 % more likely
    assert _verdict(stat(0.1, 0.2), lower_is_better=True) == "worse"
    assert _verdict(stat(0.1, 0.2), lower_is_better=False) == "better"  # ROUGE-L: higher is better
    assert _verdict(stat(-0.1, 0.0), lower_is_better=True) == "no clear difference"  # touching zero is not enough
    assert _verdict(stat(math.nan, math.nan, n=0), lower_is_better=True) == "no clear difference"


# ------------------------------------------------------------------------------------------------ merging runs
def run_of(methods, users=("alice", "bob"), shift=0.0):
    """A saved run: each user has one period-1 test item per method, ROUGE-L and NLL set by the method's index."""
    records = [
        {"method": m, "user": u, "period": 1, "phase": "period", "test_id": f"{u}-t", "n_train": 4, "rouge1": 0.1,
         "rougeL": 0.1 * (i + 1) + shift, "rougeL_stemmed": 0.1, "nll": 3.0 - 0.1 * i, "prediction": "p",
         "reference": "r"}
        for i, m in enumerate(methods) for u in users
    ]  # fmt: skip
    return {"records": records, "methods": list(methods), "users": {u: [{"train": 4, "test": 0},
            {"train": 4, "test": 1}] for u in users}, "config": {"num_periods": 2}}  # fmt: skip


def test_merge_results_adds_the_other_runs_methods_and_the_tuned_bootstrap():
    old, new = run_of(["base", "spring"]), run_of(["spring", "spring-tuned"], shift=0.5)
    new["tuning"] = {"options": {"learning_rate": 0.003}, "report": {"cost": {"seconds": 60, "ratio": 2.0,
                     "max_cost": 3, "rungs": 1}, "pareto": []}}  # fmt: skip
    merged = merge_results([old, new])
    assert merged["methods"] == ["base", "spring", "spring-tuned"]
    spring_rows = [r for r in merged["records"] if r["method"] == "spring"]
    assert [r["rougeL"] for r in spring_rows] == [0.2, 0.2]  # a method in both runs: the first run's records
    assert set(merged["bootstrap_tuned"]) == {"base", "spring"}
    assert merged["bootstrap_tuned"]["base"]["nll"]["mean"] == pytest.approx(-0.1)  # 2.9 − 3.0 (tuned is index 1)
    assert merged["tuning"] == new["tuning"] and len(merged["merged_from"]) == 2
    text = markdown_table(merged)
    assert (
        "SPRInG tuned minus each method" in text and "chose: learning_rate 0.003" in text and "2.00 training" in text
    )
    # The benchmark's own layout (`results["tuning"]`: cost and Pareto front at the top) prints the same.
    flat = {"options": {"learning_rate": 0.003}, "cost": new["tuning"]["report"]["cost"],
            "pareto": [{"learning_rate": 0.003, "num_train_epochs": 2, "selection": "all", "trained_samples": 52.0,
                        "validation_nll": 4.4}]}  # fmt: skip
    text = markdown_table({**merged, "tuning": flat})
    assert "2.00 training" in text and "| 0.003 | 2 | all | 52 | 4.4000 |" in text


def test_merge_results_refuses_other_users_or_items():
    with pytest.raises(ValueError, match="at least two"):
        merge_results([run_of(["base"])])
    with pytest.raises(ValueError, match="users or splits"):
        merge_results([run_of(["base"]), run_of(["spring"], users=("alice", "carol"))])
    other = run_of(["spring"])
    other["records"][0]["test_id"] = "elsewhere"
    with pytest.raises(ValueError, match="different test items"):
        merge_results([run_of(["base"]), other])
    other = run_of(["spring"])
    other["config"] = {**other["config"], "model": "another-model", "seed": 1}
    with pytest.raises(ValueError, match=r"differ in \['model', 'seed'\]"):
        merge_results([run_of(["base"]), other])


def test_spring_report_merge_cli(tmp_path, capsys):
    from transformers_spring.cli import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run_of(["base", "spring"])))
    b.write_text(json.dumps(run_of(["spring-tuned"])))
    assert main(["report", str(a), str(tmp_path / "out"), "--merge", str(b)]) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["methods"] == ["base", "spring", "spring-tuned"]
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(run_of(["x"], users=("zed",))))
    assert main(["report", str(a), "--merge", str(bad)]) == 2
    assert "users or splits" in capsys.readouterr().err
    assert main(["report", str(a), "--merge"]) == 2
