"""Summaries, tables and plots of benchmark results (the dict [`ContinualBenchmark.run`] returns)."""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..persistence.atomic import atomic_write_text
from .methods import METHODS
from .metrics import ROUGE_TYPES, mean_rouge, paired_bootstrap


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _period(summary: dict[str, Any], t: int) -> dict[str, Any]:
    """One period's scores of a method's summary (int keys in memory, str keys once read back from JSON)."""
    periods = summary["periods"]
    return periods[t] if t in periods else periods[str(t)]


def _periods(results: dict[str, Any]) -> list[int]:
    first = next(iter(results["summary"].values()))
    return sorted(int(t) for t in first["periods"])


def markdown_table(results: dict[str, Any]) -> str:
    """The per-period table (unstemmed ROUGE-1 / ROUGE-L per period; their period average, stemmed ROUGE-L and
    the gold response's per-token NLL), stemmed ROUGE-L and NLL per period, then forgetting and the cold-start bucket, then the paired bootstrap of
    SPRInG against every other method, as GitHub markdown. The best period-average ROUGE-L and the lowest NLL are
    in bold."""
    summary = results["summary"]
    periods = _periods(results)
    header = ["Method"] + [f"P{t} R-1 | P{t} R-L" for t in periods] + ["Avg R-1 | Avg R-L | Avg R-L stem | NLL"]
    head = "| " + " | ".join(header) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(periods) + 4)]
    best = max((s["average"]["rougeL"] for s in summary.values()), default=math.nan)
    nlls = [s["average"].get("nll", math.nan) for s in summary.values()]
    lowest = min((v for v in nlls if not math.isnan(v)), default=math.nan)
    for method, s in summary.items():
        cells = [_label(method)]
        for t in periods:
            p = _period(s, t)
            cells += [_fmt(p["rouge1"]), _fmt(p["rougeL"])]
        avg = s["average"]
        avg_l, nll = _fmt(avg["rougeL"]), _fmt(avg.get("nll", math.nan))
        cells += [
            _fmt(avg["rouge1"]),
            f"**{avg_l}**" if avg["rougeL"] == best else avg_l,
            _fmt(avg.get("rougeL_stemmed", math.nan)),
            f"**{nll}**" if avg.get("nll") == lowest else nll,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = {t: _period(next(iter(summary.values())), t)["n"] for t in periods}
    lines.append("")
    lines.append(
        "ROUGE F-measures are unstemmed (LaMP's official setting) except the stemmed column; NLL is the gold "
        "response's per-token negative log-likelihood under what each method decodes with (floors have none). "
        "Test items per period: " + ", ".join(f"P{t} {n[t]}" for t in periods) + "."
    )
    header = ["Method"] + [f"P{t} R-L stem | P{t} NLL" for t in periods]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * (1 + 2 * len(periods))]
    for method, s in summary.items():
        cells = [_label(method)]
        for t in periods:
            p = _period(s, t)
            cells += [_fmt(p.get("rougeL_stemmed", math.nan)), _fmt(p.get("nll", math.nan))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Method | Forgetting R-L (P1 after P1 − after last) | Cold-start R-L (n) | Others R-L (n) |",
              "|---|---|---|---|"]  # fmt: skip
    for method, s in summary.items():
        f, c, w = s["forgetting"], s["cold_start"], s["warm"]
        lines.append(
            f"| {_label(method)} | {_fmt(f['rougeL'])} | {_fmt(c['rougeL'])} ({c['n']}) | {_fmt(w['rougeL'])} ({w['n']}) |"
        )
    for key, who, short in (("bootstrap", "SPRInG", "SPRInG"), ("bootstrap_tuned", "SPRInG tuned", "tuned")):
        table = results.get(key) or {}
        if table:
            lines += ["", f"Paired bootstrap (95 %) of {who} minus each method, over the same test items:", "",
                      f"| Method | Δ R-L [95 % CI] | Δ NLL [95 % CI] (negative: {short} more likely) |",
                      "|---|---|---|"]  # fmt: skip
            for method, entry in table.items():
                lines.append(f"| {_label(method)} | {_interval(entry['rougeL'])} | {_interval(entry['nll'])} |")
    if results.get("tuning"):
        lines += ["", *tuning_markdown(results["tuning"])]
    drift = results.get("drift_bootstrap") or {}
    if drift:
        lines += ["", "Drift selection at λ = 0 (adapters alone): SPRInG's top-30 % adapter minus each, paired "
                  "bootstrap (95 %):", "",
                  "| Method | Δ NLL [95 % CI] (negative: top-30 % more likely) | Δ R-L [95 % CI] |", "|---|---|---|"]  # fmt: skip
        for method, entry in drift.items():
            lines.append(f"| {_label(method)} | {_interval(entry['nll'])} | {_interval(entry['rougeL'])} |")
        # Beside the drift table only: a run without the drift ablations has no heavy-author question either.
        heavy = results.get("drift_bootstrap_heavy")
        if heavy is not None:
            lines += ["", *_heavy_markdown(heavy)]
    return "\n".join(lines)


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """`spring-tuned`'s choice, its cost and the Pareto front of validation NLL against trained samples, as markdown
    lines, from a [`TuningResult.to_dict`]."""
    # `results["tuning"]` keeps `cost` and `pareto` at the top; `TuningResult.to_dict()` nests them under `report`.
    options, report = tuning.get("options", {}), {**tuning.get("report", {}), **tuning}
    cost = report.get("cost") or {}
    lines = ["`spring tune` on the training split (validation only) chose: " + ", ".join(
        f"{key} {value}" for key, value in options.items()) + "."]  # fmt: skip
    if cost:
        lines.append(
            f"Cost: {cost.get('seconds', math.nan) / 60:.1f} min, {cost.get('ratio', math.nan):.2f} training passes "
            f"(budget {cost.get('max_cost', math.nan):g}), {cost.get('rungs', '?')} halving rung(s)."
        )
    pareto = report.get("pareto") or []
    if pareto:
        lines += ["", "| lr | epochs | selection | trained samples | validation NLL |", "|---|---|---|---:|---:|"]
        for t in pareto:
            lines.append(f"| {t['learning_rate']:g} | {t['num_train_epochs']:g} | {t['selection']} | "
                         f"{t['trained_samples']:g} | {t['validation_nll']:.4f} |")  # fmt: skip
    return lines


# The settings two merged runs must share (besides their users and test items): the model and how every method is
# prompted, decoded and scored. Methods, grids, output folders and threads may differ.
MERGE_SAME_SETTINGS = ("model", "preset", "num_periods", "test_fraction", "prompt_template", "history_item_template",
                       "max_new_tokens", "budget_quantile", "stop_at_newline", "nll", "repetition_penalty",
                       "generation_batch_size", "encoder", "seed", "bm25_idf")  # fmt: skip


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One benchmark result from several runs on the same users and test items, each contributing its methods: for
    adding a method to a long run without running the others again. The runs must hold the same users with the same
    per-period train/test counts and the same test ids; a method in two runs is taken from the first. The first
    run's settings are kept, and `merged_from` records every run's methods, settings and timings. The runs must also
    share the settings of [`MERGE_SAME_SETTINGS`] (model, prompts, decoding, scoring, seed).

    Args:
        results (`Sequence[dict]`): [`ContinualBenchmark.run`] outputs or `results.json` files read back.

    Raises:
        `ValueError`: fewer than two runs, or runs whose users, splits or test items differ (named).
    """
    if len(results) < 2:
        raise ValueError("merge_results needs at least two runs.")
    first = results[0]

    def test_ids(run: dict[str, Any]) -> set[tuple]:
        return {(r["user"], r["period"], r["phase"], r["test_id"]) for r in run["records"]}

    ids = test_ids(first)
    for i, run in enumerate(results[1:], start=1):
        for key in ("records", "methods", "users"):
            if key not in run:
                raise ValueError(f"run {i} lacks {key!r}; pass benchmark results.json files.")
        if run["users"] != first["users"]:
            differ = sorted(set(run["users"]) ^ set(first["users"])) or sorted(
                u for u in first["users"] if run["users"].get(u) != first["users"][u]
            )
            raise ValueError(f"run {i} and run 0 differ in their users or splits ({differ[:5]}); only runs on the "
                             "same users and periods can be merged.")  # fmt: skip
        if test_ids(run) != ids:
            raise ValueError(f"run {i} and run 0 decoded different test items; only runs on the same splits can be "
                             "merged.")  # fmt: skip
        differ = [key for key in MERGE_SAME_SETTINGS
                  if (run.get("config") or {}).get(key) != (first.get("config") or {}).get(key)]  # fmt: skip
        if differ:
            raise ValueError(f"run {i} and run 0 differ in {differ}: their methods would not be compared on the same "
                             "model and decoding.")  # fmt: skip
    methods: list[str] = []
    records: list[dict[str, Any]] = []
    for run in results:
        new = [m for m in run["methods"] if m not in methods]
        methods += new
        records += [r for r in run["records"] if r["method"] in new]
    merged = dict(first)
    merged["methods"], merged["records"] = methods, records
    for run in results[1:]:
        if "tuning" in run and "tuning" not in merged:
            merged["tuning"] = run["tuning"]
    merged["merged_from"] = [
        {"methods": run["methods"], "config": run.get("config"), "timing_s": run.get("timing_s")} for run in results
    ]
    return rebuild_report(merged)


def _verdict(stat: dict[str, Any], lower_is_better: bool) -> str:
    """The verdict on the top-30 % adapter minus another: better or worse when the 95 % interval lies wholly on one
    side of zero, "no clear difference" otherwise (or without items)."""
    if not stat.get("n") or math.isnan(stat["low"]) or math.isnan(stat["high"]):
        return "no clear difference"
    if stat["high"] < 0:
        return "better" if lower_is_better else "worse"
    if stat["low"] > 0:
        return "worse" if lower_is_better else "better"
    return "no clear difference"


def _heavy_markdown(heavy: dict[str, Any]) -> list[str]:
    """The heavy-author section of [`markdown_table`]: who, each adapter's levels, the paired intervals and one
    generated sentence."""
    min_items = heavy.get("min_items", HEAVY_MIN_ITEMS)
    lines = [f"### The paper's regime: heavy authors (>= {min_items} items)", ""]
    users = heavy.get("users") or []
    if not users:
        return lines + [f"No author has at least {min_items} items (train + test over all periods) in this run."]
    counts = heavy.get("user_items") or {}
    named = ", ".join(f"{user} ({counts[user]})" if user in counts else user for user in users)
    lines += [f"{len(users)} author(s) with at least {min_items} items (train + test over all periods): {named}; "
              f"{heavy.get('test_items', 0)} test items.", ""]  # fmt: skip
    means = heavy.get("means") or {}
    if means:
        lines += ["Per-item means over these test items (periods pooled), adapters alone:", "",
                  "| Method (λ = 0) | NLL | R-L | n |", "|---|---|---|---|"]  # fmt: skip
        for method, m in means.items():
            lines.append(f"| {_label(method)} | {_fmt(m['nll'])} | {_fmt(m['rougeL'])} | {m['n']} |")
        lines.append("")
    others = [m for m in DRIFT_ABLATIONS if m in heavy]
    if not others:
        return lines + ["No paired comparison: the run lacks the top-30 % adapter or both ablations."]
    lines += ["SPRInG's top-30 % adapter minus each, paired bootstrap (95 %) over the heavy authors' test items:", "",
              "| Method | Δ NLL [95 % CI] (negative: top-30 % more likely) | Δ R-L [95 % CI] |", "|---|---|---|"]  # fmt: skip
    for method in others:
        entry = heavy[method]
        lines.append(f"| {_label(method)} | {_interval(entry['nll'])} | {_interval(entry['rougeL'])} |")
    verdicts = [
        f"against {_label(m)}: {_verdict(heavy[m]['nll'], True)} by NLL, {_verdict(heavy[m]['rougeL'], False)} by "
        "ROUGE-L"
        for m in others
    ]
    lines += ["", f"On these authors the drift top-30 % adapter is, {'; '.join(verdicts)} (a 95 % interval wholly "
              "on one side of zero decides; otherwise no clear difference)."]  # fmt: skip
    return lines


def _interval(stat: dict[str, Any]) -> str:
    if not stat.get("n"):
        return "–"
    return f"{stat['mean']:+.4f} [{stat['low']:+.4f}, {stat['high']:+.4f}] (n={stat['n']})"


def plot_rouge_l(results: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """A PNG of ROUGE-L per period, one line per method (the period average in the legend). Returns the path, or
    `None` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..persistence.atomic import atomic_write_bytes

    summary = results["summary"]
    periods = _periods(results)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = plt.get_cmap("tab20").colors  # up to 20 methods, each its own colour
    for i, (method, s) in enumerate(summary.items()):
        values = [_period(s, t)["rougeL"] for t in periods]
        style = "-" if method.startswith("spring") else "--"
        width = 2.5 if method == "spring" else 1.2
        ax.plot(periods, values, style, marker="o", linewidth=width, color=colors[i % len(colors)],
                label=f"{_label(method)} (avg {s['average']['rougeL']:.3f})")  # fmt: skip
    ax.set_xticks(periods, [f"P{t}" for t in periods])
    ax.set_xlabel("period")
    ax.set_ylabel("ROUGE-L (F, unstemmed)")
    config = results.get("config", {})
    ax.set_title(f"ROUGE-L per period — {len(results.get('users', {}))} users, {config.get('model', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def lamp_predictions(results: dict[str, Any], method: str, task: str = "LaMP_4") -> dict[str, Any]:
    """One method's predictions of the period phase in LaMP's format, `{"task", "golds": [{"id", "output"}]}`,
    which LaMP's `eval/eval_task.py --preds_json` reads (ids are the test items' ids)."""
    rows = [r for r in results["records"] if r["method"] == method and r["phase"] == "period"]
    return {"task": task, "golds": [{"id": str(r["test_id"]), "output": r["prediction"]} for r in rows]}


def lamp_golds(results: dict[str, Any], task: str = "LaMP_4") -> dict[str, Any]:
    """The gold outputs of the same test items, in LaMP's outputs format (`--golds_json`)."""
    seen: dict[str, str] = {}
    for r in results["records"]:
        if r["phase"] == "period":
            seen.setdefault(str(r["test_id"]), r["reference"])
    return {"task": task, "golds": [{"id": key, "output": value} for key, value in seen.items()]}


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-sample means of the ROUGE columns and of the NLL (NaN when no row has one)."""
    nlls = [r["nll"] for r in rows if r.get("nll") is not None]
    return {**mean_rouge(rows), "nll": statistics.fmean(nlls) if nlls else math.nan}


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str], num_periods: int,
              cold_start_max_train: int = 5) -> dict[str, Any]:  # fmt: skip
    """Per method: ROUGE and NLL per period (per-sample mean), the period average (mean of the period means),
    forgetting (period 1's test split after period 1 minus after the last period) and the cold-start bucket.

    Args:
        records (`Sequence[dict]`): the benchmark's records.
        methods (`Sequence[str]`): method ids, in table order.
        num_periods (`int`): periods per user (period 0 is not evaluated).
        cold_start_max_train (`int`, *optional*, defaults to 5): the cold-start bucket's training-item limit.
    """
    metrics = (*ROUGE_TYPES, "nll")
    summary: dict[str, Any] = {}
    for method in methods:
        own = [r for r in records if r["method"] == method]
        periods = {}
        for t in range(1, num_periods):
            rows = [r for r in own if r["phase"] == "period" and r["period"] == t]
            periods[t] = {**_means(rows), "n": len(rows)}
        average = {}
        for name in metrics:  # the mean of the period means (periods without a value, e.g. no NLL, left out)
            values = [p[name] for p in periods.values() if p["n"] and not math.isnan(p[name])]
            average[name] = statistics.fmean(values) if values else math.nan
        later = {(r["user"], r["test_id"]): r for r in own if r["phase"] == "forgetting"}
        first = [r for r in own if r["phase"] == "period" and r["period"] == 1 and (r["user"], r["test_id"]) in later]
        after = [later[(r["user"], r["test_id"])] for r in first]
        before_mean, after_mean = _means(first), _means(after)
        forgetting = {name: before_mean[name] - after_mean[name] for name in metrics}
        forgetting.update(n=len(first), after_last=after_mean)
        cold = [r for r in own if r["phase"] == "period" and r["n_train"] <= cold_start_max_train]
        warm = [r for r in own if r["phase"] == "period" and r["n_train"] > cold_start_max_train]
        summary[method] = {
            "periods": periods,
            "average": average,
            "forgetting": forgetting,
            "cold_start": {**_means(cold), "n": len(cold)},
            "warm": {**_means(warm), "n": len(warm)},
        }
    return summary


# The drift question (paper Table 2): the drift-selected adapter against random and full selection, all at λ = 0.
DRIFT_ABLATIONS = ("spring-random30", "all-100")


def drift_bootstrap(records: Sequence[dict[str, Any]], methods: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """[`bootstrap_table`] of `spring-lambda0` (the drift top-30 % adapter alone) against the Random-30 % and
    All-100 % adapters, where the run has them; empty otherwise."""
    others = [m for m in DRIFT_ABLATIONS if m in methods]
    if "spring-lambda0" not in methods or not others:
        return {}
    return bootstrap_table(records, ["spring-lambda0", *others], reference="spring-lambda0", seed=seed)


# The paper's users have long histories; in the news benchmark only its heaviest authors come close.
HEAVY_MIN_ITEMS = 150


def _total_items(periods: Any) -> int:
    """A user's items over every period from `results["users"]`: a list of per-period `{"train", "test"}` counts
    (or a dict keyed by period)."""
    rows = periods.values() if isinstance(periods, dict) else periods
    return sum(int(p.get("train", 0)) + int(p.get("test", 0)) for p in rows)


def heavy_users(users: dict[str, Any] | None, heavy_min_items: int = HEAVY_MIN_ITEMS) -> dict[str, int]:
    """The users with at least `heavy_min_items` items (train + test summed over periods), heaviest first.

    Args:
        users (`dict`): `results["users"]`, user to per-period `{"train", "test"}` counts; `None` or empty gives
            no user.
        heavy_min_items (`int`, *optional*, defaults to `HEAVY_MIN_ITEMS`): the inclusive threshold.

    Returns:
        `dict[str, int]`: user to total items, ordered by total (descending), then name.
    """
    totals = {user: _total_items(periods) for user, periods in (users or {}).items()}
    heavy = [(user, n) for user, n in totals.items() if n >= heavy_min_items]
    return dict(sorted(heavy, key=lambda item: (-item[1], item[0])))


def drift_bootstrap_heavy(
    results: dict[str, Any], heavy_min_items: int = HEAVY_MIN_ITEMS, seed: int = 0
) -> dict[str, Any]:
    """[`drift_bootstrap`] on the heavy users' records only, with each adapter's mean NLL and ROUGE-L there.

    Args:
        results (`dict`): a benchmark's results (`records`, `methods`, `users`).
        heavy_min_items (`int`, *optional*, defaults to `HEAVY_MIN_ITEMS`): a user is heavy from this many items on.
        seed (`int`, *optional*, defaults to 0): the resampling seed.

    Returns:
        `dict`: `min_items`, `users` (heaviest first), `user_items` (their totals; with no heavy user `users` is
        `[]` and nothing follows), `test_items` (distinct test items of phase "period"), `means` (per method
        present of `spring-lambda0` and the drift ablations: per-sample mean `nll`, `rougeL` and `n` over those
        items, periods pooled) and, where the run has the methods, [`drift_bootstrap`]'s entries keyed by method.
    """
    totals = heavy_users(results.get("users"), heavy_min_items)
    heavy: dict[str, Any] = {"min_items": heavy_min_items, "users": list(totals), "user_items": totals}
    if not totals:
        return heavy
    records = [r for r in results.get("records", []) if r["user"] in totals]
    methods = results.get("methods", [])
    period_rows = [r for r in records if r["phase"] == "period"]
    heavy["test_items"] = len({(r["user"], r["period"], r["test_id"]) for r in period_rows})
    heavy["means"] = {}
    for method in ("spring-lambda0", *DRIFT_ABLATIONS):
        own = [r for r in period_rows if r["method"] == method]
        if method in methods and own:
            means = _means(own)
            heavy["means"][method] = {"nll": means["nll"], "rougeL": means["rougeL"], "n": len(own)}
    heavy.update(drift_bootstrap(records, methods, seed=seed))
    return heavy


def bootstrap_table(
    records: Sequence[dict[str, Any]], methods: Sequence[str], reference: str = "spring", seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Paired-bootstrap 95 % intervals of `reference` minus each other method, over the test items both decoded
    (phase "period"): unstemmed ROUGE-L (higher is better) and per-token NLL (lower is better; floors have none).

    Returns:
        `dict`: per other method, `{"rougeL": {...}, "nll": {...}}` with `mean`, `low`, `high` and `n`.
    """
    keyed: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r["phase"] == "period":
            keyed[r["method"]][(r["user"], r["period"], r["test_id"])] = r
    ref = keyed.get(reference, {})
    table = {}
    for method in methods:
        if method == reference:
            continue
        shared = [key for key in ref if key in keyed[method]]
        entry = {"rougeL": paired_bootstrap([ref[k]["rougeL"] for k in shared],
                                            [keyed[method][k]["rougeL"] for k in shared], seed=seed)}  # fmt: skip
        with_nll = [k for k in shared if ref[k].get("nll") is not None and keyed[method][k].get("nll") is not None]
        entry["nll"] = paired_bootstrap([ref[k]["nll"] for k in with_nll],
                                        [keyed[method][k]["nll"] for k in with_nll], seed=seed)  # fmt: skip
        table[method] = entry
    return table


def rebuild_report(results: dict[str, Any], heavy_min_items: int = HEAVY_MIN_ITEMS) -> dict[str, Any]:
    """`results` with `summary`, `bootstrap`, `drift_bootstrap` and `drift_bootstrap_heavy` recomputed from its
    records by this version of the package (e.g. for a run made, or resumed, with an older one). Records, settings
    and timings are kept.

    Args:
        results (`dict`): what [`ContinualBenchmark.run`] returned, or `results.json` read back.
        heavy_min_items (`int`, *optional*, defaults to `HEAVY_MIN_ITEMS`): the item count from which a user
            counts as heavy for [`drift_bootstrap_heavy`].
    """
    for key in ("records", "methods", "config"):
        if key not in results:
            raise ValueError(f"`results` lacks {key!r}; pass a benchmark's results.json.")
    config, records, methods = results["config"], results["records"], results["methods"]
    rebuilt = dict(results)
    rebuilt["summary"] = summarize(records, methods, config["num_periods"], config.get("cold_start_max_train", 5))
    rebuilt["bootstrap"] = bootstrap_table(records, methods, "spring") if "spring" in methods else {}
    rebuilt["bootstrap_tuned"] = bootstrap_table(records, methods, "spring-tuned") if "spring-tuned" in methods else {}
    rebuilt["drift_bootstrap"] = drift_bootstrap(records, methods)
    rebuilt["drift_bootstrap_heavy"] = drift_bootstrap_heavy(results, heavy_min_items)
    return rebuilt


# ------------------------------------------------------------------------------------------------------ LoGo study
LOGO_LABELS = {
    "spring-local": "SPRInG (local only)",
    "spring-logo-consented": "SPRInG + consented retrieval",
    "spring-community": "SPRInG + community adapter",
    "spring-community-consented": "SPRInG + community adapter + consented retrieval",
    # the arms of studies run before the sharing policy (their results.json still report)
    "spring-logo": "SPRInG + LoGo",
    "spring-logo-open": "SPRInG + LoGo, sharing rule off",
}
COLD_START_MAX_CUT = 5


def _paired_by_item(rows: Sequence[dict[str, Any]], method: str, reference: str, metric: str, seed: int = 0):
    """Paired bootstrap of `method − reference` on `metric`, one value per test item: an item seen under several
    history cuts (the cold bucket pools m = 0..5) counts once, with its mean difference, so the interval does not
    treat one item's cuts as independent items."""
    by_key: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["method"] in (method, reference) and r.get(metric) is not None:
            by_key[(r["user"], r["test_id"], str(r["cut"]))][r["method"]] = r[metric]
    per_item: dict[tuple, list[float]] = defaultdict(list)
    for (user, test_id, _), values in by_key.items():
        if method in values and reference in values:
            per_item[(user, test_id)].append(values[method] - values[reference])
    diffs = [statistics.fmean(v) for v in per_item.values()]
    return paired_bootstrap(diffs, [0.0] * len(diffs), seed=seed)


def _per_item(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per test item: an item seen under several history cuts (the pooled cold bucket) gets the mean of its
    scores, so bucket means weigh items as the paired bootstrap does. `global_items` becomes the share of its rows
    that used a global item."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["user"], r["test_id"])].append(r)
    out = []
    for group in groups.values():
        merged = {key: statistics.fmean([r[key] for r in group]) for key in (*ROUGE_TYPES, "nll")}
        merged["global_items"] = statistics.fmean([r["global_items"] > 0 for r in group])
        out.append(merged)
    return out


def summarize_logo(results: dict[str, Any]) -> dict[str, Any]:
    """Per bucket (each history cut, `cold` = cuts m <= 5 pooled, `warm` = "all", `bias` = the bias items at
    "all"): per method the mean NLL, unstemmed ROUGE-1 / ROUGE-L and stemmed ROUGE-L over test items (an item's
    cuts averaged first; `n` counts items), the share of rows that used a global item, and the paired bootstrap of
    each LoGo arm minus local-only SPRInG (NLL: negative is better)."""
    records = results["records"]
    methods = [m for m in LOGO_LABELS if any(r["method"] == m for r in records)]
    cuts = sorted({str(r["cut"]) for r in records}, key=lambda c: (c == "all", int(c) if c != "all" else 0))
    buckets = {f"m={c}": [r for r in records if str(r["cut"]) == c] for c in cuts}
    buckets["cold"] = [r for r in records if r["cut"] != "all" and int(r["cut"]) <= COLD_START_MAX_CUT]
    buckets["warm"] = [r for r in records if r["cut"] == "all"]
    buckets["bias"] = [r for r in records if r["cut"] == "all" and r.get("bias")]
    summary = {}
    for name, rows in buckets.items():
        entry: dict[str, Any] = {}
        for method in methods:
            own = _per_item([r for r in rows if r["method"] == method])
            entry[method] = {
                **_means(own), "n": len(own),
                "global_share": statistics.fmean([r["global_items"] for r in own]) if own else math.nan,
            }  # fmt: skip
        for method in methods[1:]:
            entry[f"{method} - spring-local"] = {
                metric: _paired_by_item(rows, method, "spring-local", metric) for metric in ("nll", "rougeL")
            }
        summary[name] = entry
    return summary


def logo_markdown(results: dict[str, Any]) -> str:
    """The LoGo study's tables: per bucket, each arm's NLL and ROUGE, and the paired bootstrap against local-only
    SPRInG, as GitHub markdown."""
    summary = results["summary"]
    methods = [m for m in LOGO_LABELS if any(m in entry for entry in summary.values())]
    lines = [
        "| Bucket | Method | n | NLL | R-1 | R-L | R-L stem | rows using global |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bucket, entry in summary.items():
        for method in methods:
            s = entry.get(method)
            if not s or not s["n"]:
                continue
            cells = [bucket, LOGO_LABELS[method], str(s["n"]), _fmt(s["nll"]), _fmt(s["rouge1"]), _fmt(s["rougeL"]),
                     _fmt(s["rougeL_stemmed"]), f"{100 * s['global_share']:.0f} %"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired bootstrap (95 %, one value per test item) of each LoGo arm minus local-only SPRInG:",
        "",
        "| Bucket | Arm | Δ NLL [95 % CI] (negative: LoGo better) | Δ R-L [95 % CI] |",
        "|---|---|---|---|",
    ]
    for bucket, entry in summary.items():
        for method in methods[1:]:
            d = entry.get(f"{method} - spring-local")
            if d:
                lines.append(
                    f"| {bucket} | {LOGO_LABELS[method]} | {_interval(d['nll'])} | {_interval(d['rougeL'])} |"
                )
    rule, policy = results.get("rule"), results.get("policy")
    if policy:
        lines += ["", f"Sharing policy: {policy.get('sharing_policy')} ({policy.get('consenting_users')} users "
                  f"consented); gate σ={results.get('gate_sigma')}."]  # fmt: skip
        for fold, adapters in (results.get("communities") or {}).items():
            sizes = ", ".join(f"{a['members']} users / {a['items']} items" for a in adapters) or "none"
            lines.append(f"Community adapters used by fold {fold}: {sizes}.")
    elif rule:
        lines += ["", f"Sharing rule: min_contributors={rule.get('min_contributors')}, "
                  f"match_threshold={rule.get('match_threshold')}; gate σ={results.get('gate_sigma')}."]  # fmt: skip
    return "\n".join(lines)


def plot_logo_gain(results: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """A PNG of the NLL gain of each LoGo arm over local-only SPRInG (local minus LoGo: above zero, LoGo is better)
    against the history size m, with 95 % bootstrap intervals. `None` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..persistence.atomic import atomic_write_bytes

    summary = results["summary"]
    cuts = [key for key in summary if key.startswith("m=")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    arms = [
        m for m in LOGO_LABELS if m != "spring-local" and any(f"{m} - spring-local" in e for e in summary.values())
    ]
    for i, method in enumerate(arms):
        offset = 0.16 * (i - (len(arms) - 1) / 2)
        key = f"{method} - spring-local"
        points = [(i, summary[c][key]["nll"]) for i, c in enumerate(cuts) if key in summary[c]]
        points = [(i, d) for i, d in points if d["n"]]
        if not points:
            continue
        x = [i + offset for i, _ in points]
        y = [-d["mean"] for _, d in points]
        # The gain is −Δ, so its interval is [−high, −low].
        err = [[d["high"] - d["mean"] for _, d in points], [d["mean"] - d["low"] for _, d in points]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=LOGO_LABELS[method])
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cuts)), [c[2:] for c in cuts])
    ax.set_xlabel("history size m (the user's first m items)")
    ax.set_ylabel("NLL gain over local-only SPRInG (nats/token)")
    ax.set_title("Collective knowledge: NLL gain by history size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def save_results(results: dict[str, Any], out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Writes `results.json`, `results.md` (the table), LaMP-format predictions (`lamp/<method>.json` and
    `lamp/golds.json`, for LaMP's own `eval_task.py`) and, with matplotlib, `rouge_l_per_period.png` into
    `out_dir` (each file atomically). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(paths["markdown"], markdown_table(results) + "\n")
    task = (results.get("config") or {}).get("lamp_task") or "LaMP_4"
    (out / "lamp").mkdir(exist_ok=True)
    paths["lamp_golds"] = atomic_write_text(out / "lamp" / "golds.json", json.dumps(lamp_golds(results, task)))
    for method in results.get("methods", []):
        atomic_write_text(out / "lamp" / f"{method}.json", json.dumps(lamp_predictions(results, method, task)))
    if plot:
        paths["plot"] = plot_rouge_l(results, out / "rouge_l_per_period.png")
    return paths


def save_logo_results(results: dict[str, Any], out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Writes `results.json`, `results.md` (the bucket tables) and, with matplotlib, `logo_nll_gain.png` (the NLL gain
    of LoGo over local-only SPRInG against the history size) into `out_dir`. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(paths["markdown"], logo_markdown(results) + "\n")
    if plot:
        paths["plot"] = plot_logo_gain(results, out / "logo_nll_gain.png")
    return paths
