"""`summarize`, the bootstrap tables, `markdown_table` and `plot_rouge_l` on hand-written records and results."""

import json
import math

import pytest

from transformers_spring.evaluation import drift_bootstrap, markdown_table, summarize
from transformers_spring.evaluation.metrics import paired_bootstrap
from transformers_spring.evaluation.report import plot_rouge_l


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
