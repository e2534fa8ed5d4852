"""The `spring` command: `spring demo` (the project's main job) and `spring bench` (the full benchmark)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

USAGE = """usage: spring {demo,bench,bench-logo,report} [options]

  spring demo   SPRInG end to end on the shipped news subset (SmolLM2-135M-Instruct, a few authors, 5 periods):
                prints the per-period ROUGE table against Base and RAG and saves results + a PNG plot.
  spring bench  the continual-personalization benchmark: every method on the same model, users and splits
                (`spring bench --help` lists the options).
  spring bench-logo
                the LoGo study: local-only SPRInG against SPRInG + the global memory for cold-start (history cut to
                the first m items) and skewed-history users, the mediator fitted on validation queries
                (`spring bench-logo --help`).
  spring report RESULTS_JSON [OUT_DIR]
                recomputes the summary and bootstrap tables of a saved run with this version and writes
                results.json, results.md, LaMP files and the plot to OUT_DIR (default: beside RESULTS_JSON).
"""

# The demo: 6 authors of the shipped subset, the methods users compare SPRInG with first (`DEMO_METHODS`), and the
# LoRA learning rate and epochs the full `spring bench` run chose on its validation split (docs/benchmark.md), so
# that the demo need not repeat the 8-point selection.
DEMO_DEFAULTS = {
    "users": 6, "min_items": 10, "max_items": 40, "out": "spring-demo", "learning_rates": "", "learning_rate": 3e-3,
    "num_train_epochs": 2.0,
}  # fmt: skip


# Switches whose default comes from the task preset (`bool | None` fields). HfArgumentParser gives a field whose
# default is None neither a bare `--x` form nor `--no_x`; `_parse` adds both, as it does for plain bool fields.
PRESET_SWITCHES = ("stop_at_newline", "lamp_queries")


def _parse(argv: Sequence[str], defaults: dict, prog: str, arguments: type | None = None):
    from transformers import HfArgumentParser

    from .evaluation import BenchmarkArguments
    from .utils.compat import parser_action

    parser = HfArgumentParser(arguments or BenchmarkArguments, prog=prog)
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
    from .evaluation.report import rebuild_report

    if len(argv) not in (1, 2):
        print(f"spring report: expected RESULTS_JSON [OUT_DIR]\n\n{USAGE}", file=sys.stderr)
        return 2
    source = Path(argv[0])
    try:
        results = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"spring report: cannot read {source}: {err}", file=sys.stderr)
        return 2
    out = Path(argv[1]) if len(argv) == 2 else source.parent
    results = rebuild_report(results)
    save_results(results, out)
    print(markdown_table(results))
    print(f"\nSaved to {out}/: results.json, results.md, lamp/, rouge_l_per_period.png")
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

        defaults = {**DEMO_DEFAULTS, "methods": ",".join(DEMO_METHODS), "data": str(NEWS_SUBSET_PATH)}
        args = _parse(rest, defaults, "spring demo")
        return _run(args, "SPRInG demo")
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
