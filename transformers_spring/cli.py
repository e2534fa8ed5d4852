"""The `spring` command: `spring demo` (the project's main job), `spring train` (SPRInG on your own data),
`spring memory` (what a state holds) and `spring bench` (the full benchmark)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .evaluation.benchmark_config import BenchmarkArguments
from .training.train_job_config import BENCH_CHOSEN_TRAINING

USAGE = """usage: spring {demo,train,tune,memory,serve,bench,bench-logo,report} [options]

  spring demo   SPRInG end to end on the shipped news subset (SmolLM2-135M-Instruct, a few authors, 5 periods):
                prints the per-period ROUGE table against Base and RAG and saves results + a PNG plot.
  spring train --data my.jsonl --model ID --out DIR
                trains each user's SPRInG adapter period by period on your JSONL stream (user_id, prompt,
                response, timestamp) and saves a state that SpringForCausalLM.from_pretrained(DIR) loads; a
                checkpoint after each user, resumed when run again (`spring train --help`).
  spring tune --data my.jsonl --model ID --out tuned.json
                chooses learning rate, epochs, selection, λ, gate, top-k and retrieval region on each user's last
                period (validation only, successive halving under --max_cost); `spring train --config tuned.json`
                loads the result (`spring tune --help`).
  spring memory DIR [--user ID [--show_text]]
                what a state or memory folder holds: users, counts, periods and sharing flags (text only for one
                user, when asked).
  spring serve --state DIR --api_keys keys.json
                serves a state over an OpenAI-compatible HTTP API (/v1/chat/completions with `user`), records
                users' interactions and runs their period updates (needs the `serve` extra; `spring serve --help`).
  spring bench  the continual-personalization benchmark: every method on the same model, users and splits
                (`spring bench --help` lists the options).
  spring bench-logo
                the LoGo study: local-only SPRInG against SPRInG + the global memory for cold-start (history cut to
                the first m items) and skewed-history users, the mediator fitted on validation queries
                (`spring bench-logo --help`).
  spring report RESULTS_JSON [OUT_DIR] [--merge RESULTS_JSON ...]
                recomputes the summary and bootstrap tables of a saved run with this version and writes
                results.json, results.md, LaMP files and the plot to OUT_DIR (default: beside RESULTS_JSON);
                --merge adds the methods of other runs on the same users and test items.
"""

# The demo: 6 authors of the shipped subset, the methods users compare SPRInG with first (`DEMO_METHODS`), and the
# LoRA learning rate and epochs the full `spring bench` run chose on its validation split (docs/benchmark.md,
# `BENCH_CHOSEN_TRAINING`), so that the demo need not repeat the 8-point selection.
# SPRInG tuned searches λ, the gate and the retrieval region around SPRInG's own training settings (so its chain
# is SPRInG's, copied), on two users' validation items (the two cheapest to train: one alone, the lightest, has ~7
# items and chose SPRInG's own settings); training candidates, a second chain, more users, k = 4 or the copy path
# (each scored on its own) would take the demo past 10 minutes on 2 cores. λ is free: every λ mixes the same two
# scored paths.
DEMO_TUNE_GRID = {
    "learning_rates": f"{BENCH_CHOSEN_TRAINING['learning_rate']:g}",
    "epochs": f"{BENCH_CHOSEN_TRAINING['num_train_epochs']:g}",
    "selections": f"drift{BenchmarkArguments.selection_ratio:g}", "interpolation_weights": "0,0.25,0.5,0.75,1",
    "gates": "off,q0.75", "top_ks": "2", "regions": "buffer,history", "copy_weights": "0", "adaptive_weights": "0",
    "rung_users": 2,
}  # fmt: skip
DEMO_DEFAULTS = {"users": 6, "min_items": 10, "max_items": 40, "out": "spring-demo", "learning_rates": "",
                 "tune_grid": json.dumps(DEMO_TUNE_GRID), "tune_max_cost": 1.0}  # fmt: skip


# Switches whose default comes from the task preset (`bool | None` fields). HfArgumentParser gives a field whose
# default is None neither a bare `--x` form nor `--no_x`; `_parse` adds both, as it does for plain bool fields.
PRESET_SWITCHES = ("stop_at_newline", "lamp_queries")


def escape_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Escapes every lone `%` in the help strings: argparse %-formats help text, so "30 % selection" would print
    the option's internals. `%%` (already escaped, as transformers' own help is) and `%(name)s` placeholders stay."""
    import re

    for action in parser._actions:  # (argparse has no public iterator over its actions)
        if isinstance(action.help, str) and "%" in action.help:
            action.help = re.sub(r"%%|%\(|%", lambda m: m.group() if len(m.group()) == 2 else "%%", action.help)
    return parser


def _parse(argv: Sequence[str], defaults: dict, prog: str, arguments: type | None = None):
    from transformers import HfArgumentParser

    from .evaluation import BenchmarkArguments
    from .utils.compat import parser_action

    parser = HfArgumentParser(arguments or BenchmarkArguments, prog=prog)
    escape_help(parser)
    for name in PRESET_SWITCHES:
        action = parser_action(parser, name)
        action.nargs, action.const = "?", True  # bare `--x` means true; `--x false` still parses
        parser.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", dest=name, action="store_false", default=argparse.SUPPRESS,
                            help=f"Turn `{name}` off.")  # fmt: skip
    parser.set_defaults(**defaults)
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    return args


def _run(args, title: str) -> int:
    from transformers.utils import logging

    from .evaluation import markdown_table, run_benchmark

    logging.set_verbosity_warning()
    started = time.perf_counter()
    results = run_benchmark(args)
    minutes = (time.perf_counter() - started) / 60
    users = results["users"]
    print(f"\n{title}: {len(users)} users, {args.num_periods} periods, model {args.model}, {minutes:.1f} min\n")
    print(markdown_table(results))
    tuning = results.get("tuning")
    if tuning:  # what SPRInG tuned decoded with, and what choosing it cost
        cost = tuning["cost"]
        print(f"\nSPRInG tuned: {json.dumps(tuning['options'])}, chosen on validation in {cost['seconds'] / 60:.1f} "
              f"min ({cost['ratio']:.2f} training passes, max {cost['max_cost']:g}).")  # fmt: skip
    print(f"\nSaved to {args.out}/: results.json (every prediction), results.md, rouge_l_per_period.png")
    return 0


def _logo_arguments() -> type:
    from .evaluation import LoGoBenchmarkArguments

    return LoGoBenchmarkArguments


def _run_logo(args) -> int:
    from transformers.utils import logging

    from .evaluation import logo_markdown, run_logo_benchmark

    logging.set_verbosity_warning()
    started = time.perf_counter()
    results = run_logo_benchmark(args)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nLoGo study: {len(results['users'])} users, model {args.model}, {minutes:.1f} min\n")
    print(logo_markdown(results))
    print(f"\nSaved to {args.out}/: results.json (every prediction), results.md, logo_nll_gain.png")
    return 0


def _report(argv: Sequence[str]) -> int:
    import json
    from pathlib import Path

    from .evaluation import markdown_table, save_results
    from .evaluation.report import merge_results, rebuild_report

    argv, merged = list(argv), []
    while "--merge" in argv:  # --merge OTHER_JSON: add that run's methods (same users and test items)
        at = argv.index("--merge")
        if at + 1 >= len(argv):
            print("spring report: --merge needs a results.json", file=sys.stderr)
            return 2
        merged.append(Path(argv.pop(at + 1)))
        argv.pop(at)
    if len(argv) not in (1, 2):
        print(f"spring report: expected RESULTS_JSON [OUT_DIR] [--merge RESULTS_JSON ...]\n\n{USAGE}", file=sys.stderr)
        return 2
    source = Path(argv[0])
    runs = []
    for path in (source, *merged):
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            print(f"spring report: cannot read {path}: {err}", file=sys.stderr)
            return 2
    out = Path(argv[1]) if len(argv) == 2 else source.parent
    try:
        results = merge_results(runs) if merged else rebuild_report(runs[0])
    except ValueError as err:
        print(f"spring report: {err}", file=sys.stderr)
        return 2
    save_results(results, out)
    print(markdown_table(results))
    print(f"\nSaved to {out}/: results.json, results.md, lamp/, rouge_l_per_period.png")
    return 0


def _learning_rate_option(text: str) -> float | str:
    """`--learning_rate`'s value: `auto` or a positive float (HfArgumentParser would parse the `float | str` field
    with one of the two types only)."""
    from .training.spring_config import check_learning_rate

    try:
        return check_learning_rate(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive float, got {text!r}") from None


def _train_parser(argv: Sequence[str]):
    """`spring train`'s parser: [`TrainJobArguments`] and [`SpringTrainingArguments`] side by side (as trl's scripts
    parse a script config and a trainer config), with the job's training defaults, then `--config`'s options, then
    the flags. The learning rate, selection ratio and epochs come from `--spring_preset` unless given."""
    from transformers import HfArgumentParser

    from .training import SpringTrainingArguments
    from .training.train_job_config import TRAIN_JOB_TRAINING_DEFAULTS, TrainJobArguments, read_options_file
    from .utils.compat import parser_action

    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default=None)
    early.add_argument("--out", default=None)
    known, _ = early.parse_known_args(list(argv))
    parser = escape_help(HfArgumentParser((TrainJobArguments, SpringTrainingArguments), prog="spring train"))
    # `dataloader_pin_memory` defaults to None (decided by the accelerator), so HfArgumentParser adds no `--no_` form.
    parser.add_argument("--no_dataloader_pin_memory", "--no-dataloader-pin-memory", dest="dataloader_pin_memory",
                        action="store_false", default=argparse.SUPPRESS, help="Turn `dataloader_pin_memory` off.")  # fmt: skip
    parser_action(parser, "learning_rate").type = _learning_rate_option  # (a bad value: an error naming the flag)
    allowed = {action.dest for action in parser._actions} - {"help"}
    options = read_options_file(known.config, allowed) if known.config else {}
    out = known.out or options.get("out") or TrainJobArguments.out
    parser.set_defaults(**TRAIN_JOB_TRAINING_DEFAULTS, output_dir=str(Path(out) / "trainer_output"))
    parser.set_defaults(**options)
    return parser


def _train(argv: Sequence[str]) -> int:
    from .training.train_job import run_train_job

    try:
        parser = _train_parser(argv)
        job, training_args = parser.parse_args_into_dataclasses(args=list(argv))
        report = run_train_job(job, training_args)
    except (FileNotFoundError, ValueError, TypeError) as err:  # bad data or options: the message says which
        print(f"spring train: {err}", file=sys.stderr)
        return 2
    users = report["users"]
    print(f"\nspring train: {len(users)} user(s) trained in this run, {len(report['resumed_users'])} resumed as "
          f"done, {len(report['skipped_users'])} skipped (too few items); {report['seconds'] / 60:.1f} min.\n")  # fmt: skip
    if users:
        print("| user | periods | items | trained on per period | buffer |\n|---|---:|---:|---|---:|")
        for user, entry in users.items():
            selected = ", ".join(str(n) for n in entry["selected"]) or "-"
            print(f"| {user} | {entry['periods']} | {entry['items']} | {selected} | {entry['buffer']} |")
    choice = report.get("learning_rate_choice")
    if choice is not None:
        print(f"\nlearning_rate auto: {choice['learning_rate']:g} ({choice['rule']}).")
    gate = report["gate"]
    print(f"\nSaved to {report['out']}/ (σ = {'none' if gate is None else f'{gate:.3f}'}); decode with "
          f"SpringForCausalLM.from_pretrained({report['out']!r}) and generate(..., personalization=USER).")  # fmt: skip
    return 0


def _tune(argv: Sequence[str]) -> int:
    import json

    from transformers import HfArgumentParser

    from .training import SpringTrainingArguments
    from .training.train_job_config import TRAIN_JOB_TRAINING_DEFAULTS
    from .training.tuning import run_tune_job
    from .training.tuning_config import TuningArguments

    try:
        parser = escape_help(HfArgumentParser((TuningArguments, SpringTrainingArguments), prog="spring tune"))
        parser.set_defaults(**TRAIN_JOB_TRAINING_DEFAULTS, output_dir=str(Path("spring-tune") / "trainer_output"))
        job, training_args = parser.parse_args_into_dataclasses(args=list(argv))
        result = run_tune_job(job, training_args)
    except (FileNotFoundError, ValueError, TypeError) as err:  # bad data or options: the message says which
        print(f"spring tune: {err}", file=sys.stderr)
        return 2
    trained = sorted((t for t in result.trials if t["validation_nll"] is not None), key=lambda t: t["validation_nll"])
    print(f"\nspring tune: {len(result.trials)} trials, {result.cost['ratio']:.2f} training passes "
          f"(max {result.cost['max_cost']:g}), {result.cost['seconds'] / 60:.1f} min.\n")  # fmt: skip
    print("| stage | lr | epochs | selection | λ | β (adaptive) | gate | k | region | μ (copy) | users | val NLL |")
    print("|---|---|---|---|---|---|---|---|---|---|---:|---:|")
    for t in trained[:10]:
        print(f"| {t['stage']} | {t['learning_rate']:g} | {t['num_train_epochs']:g} | {t['selection']} | "
              f"{t.get('interpolation_weight', '-')} | {t.get('adaptive_weight', '-')} | {t.get('gate', '-')} | "
              f"{t.get('top_k', '-')} | "
              f"{t.get('retrieval_region', '-')} | {t.get('copy_weight', '-')} | {t['users']} | "
              f"{t['validation_nll']:.4f} |")  # fmt: skip
    print(f"\nChosen: {json.dumps(result.options)}")
    for note in result.notes:
        print(f"Note: {note}")
    print(f"Saved to {job.out}; train with `spring train --config {job.out} --data ... --out DIR`.")
    return 0


def _memory(argv: Sequence[str]) -> int:
    from .training.inspect_state import describe_state

    parser = escape_help(argparse.ArgumentParser(
        prog="spring memory",
        description="What a `spring train` state or a LoGoMemory folder holds: per user, history and buffer counts, "
        "first and last times, sharing flag, adapter and periods. No text unless --show_text for one --user.",
    ))  # fmt: skip
    parser.add_argument("directory", help="The state or memory folder.")
    parser.add_argument("--user", default=None, help="Only this user.")
    parser.add_argument("--show_text", "--show-text", action="store_true",
                        help="With --user: also print that user's records (cut to 200 characters).")  # fmt: skip
    args = parser.parse_args(list(argv))
    try:
        summary = describe_state(args.directory, user=args.user, show_text=args.show_text)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"spring memory: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    rows = summary["users"]
    print(f"{args.directory}: a {summary['kind']} with {summary['num_users']} user(s), "
          f"{summary['num_records']} history record(s)\n")  # fmt: skip
    state = summary["kind"] == "state"
    print("| user | history | buffer | first | last | shared |" + (" adapter | periods | observed |" if state else ""))
    print("|---|---:|---:|---|---|---|" + ("---|---:|---:|" if state else ""))
    for row in rows:
        line = (f"| {row['user_id']} | {row['history']} | {row['buffer']} | {row['first'] or '-'} | "
                f"{row['last'] or '-'} | {row['shared']} |")  # fmt: skip
        if state:
            line += f" {row['adapter'] or '-'} | {row['periods']} | {row['observed']} |"
        print(line)
    for record in summary.get("records", []):
        print(
            f"\n[{record['region']}] {record['time']}\n  prompt:   {record['prompt']}\n  response: {record['response']}"
        )
    return 0


def _serve(argv: Sequence[str]) -> int:
    try:
        from .server import ServeArguments, serve
    except ImportError as err:
        print(f"spring serve: {err}; install the server with `pip install transformers-spring[serve]`.",
              file=sys.stderr)  # fmt: skip
        return 2
    from transformers import HfArgumentParser

    parser = escape_help(HfArgumentParser(ServeArguments, prog="spring serve", description=(
        "Personalized generation over an OpenAI-compatible HTTP API: POST /v1/chat/completions and /v1/completions "
        "(`user` = whom to personalize for), POST /v1/interactions (recorded durably; a user's period update runs "
        "when --period_size of them are pending), GET and DELETE /v1/users/{user}, /health and /metrics. See "
        "docs/serving.md."
    )))  # fmt: skip
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    try:
        serve(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"spring serve: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spring` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .data import NEWS_SUBSET_PATH
        from .evaluation.methods import DEMO_METHODS

        defaults = {**DEMO_DEFAULTS, **BENCH_CHOSEN_TRAINING, "methods": ",".join(DEMO_METHODS),
                    "data": str(NEWS_SUBSET_PATH)}  # fmt: skip
        args = _parse(rest, defaults, "spring demo")
        return _run(args, "SPRInG demo")
    if command == "train":
        return _train(rest)
    if command == "tune":
        return _tune(rest)
    if command == "memory":
        return _memory(rest)
    if command == "serve":
        return _serve(rest)
    if command == "bench":
        args = _parse(rest, {}, "spring bench")
        return _run(args, "SPRInG benchmark")
    if command == "bench-logo":
        return _run_logo(_parse(rest, {}, "spring bench-logo", _logo_arguments()))
    if command == "report":
        return _report(rest)
    print(f"spring: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
