"""`TuningArguments`: what `spring tune` reads, the search space it explores and the cost it may spend. The
training settings that are not searched are a [`SpringTrainingArguments`], parsed beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..generation.config import RETRIEVAL_REGIONS
from ..utils.validation import check_bool, check_choice, check_float, check_int
from .train_job_config import PRESET_CHOICES, check_stream_job, user_ids

SELECTION_FORMS = "'drift<ratio>' (drift-selected top ratio, e.g. drift0.3) or 'all'"
GATE_FORMS = "'off' or 'q<quantile>' (e.g. q0.75)"


def _items(value: str, name: str) -> list[str]:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a comma-separated str, got {type(value).__name__}.")
    items = [part.strip() for part in value.split(",") if part.strip()]
    if not items:
        raise ValueError(f"`{name}` is an empty grid; give at least one value.")
    if len(set(items)) != len(items):
        raise ValueError(f"`{name}` repeats a value: {value!r}.")
    return items


def _number(text: str, name: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"`{name}`: {text!r} is not a number.") from None
    if not math.isfinite(number):
        raise ValueError(f"`{name}`: {text!r} is not finite.")
    return number


def parse_selection(text: str, name: str = "selections") -> float:
    """`'drift<ratio>'` → ratio, `'all'` → 1.0 (every sample, no scoring).

    Random selection is not offered: `spring train` has no option for it (the benchmark's Random-30 % subsamples
    outside the trainer), so a tuned file could not reproduce it.
    """
    if text == "all":
        return 1.0
    if text.startswith("random"):
        raise ValueError(
            f"`{name}`: {text!r}: random selection is not supported (`spring train` has no option for it); use "
            f"{SELECTION_FORMS}."
        )
    if not text.startswith("drift"):
        raise ValueError(f"`{name}`: unknown selection {text!r}; use {SELECTION_FORMS}.")
    return check_float(_number(text[len("drift") :], name), name, minimum=0.0, maximum=1.0, min_inclusive=False)


def parse_gate(text: str, name: str = "gates") -> float | None:
    """`'off'` → None, `'q<quantile>'` → the quantile."""
    if text == "off":
        return None
    if not text.startswith("q"):
        raise ValueError(f"`{name}`: unknown gate {text!r}; use {GATE_FORMS}.")
    return check_float(_number(text[1:], name), name, minimum=0.0, maximum=1.0)


@dataclass
class TuningArguments:
    """Settings of [`PersonalizationTuner`] and [`run_tune_job`] (the `spring tune` command line) other than the
    fixed training ones. Grids are comma-separated values; names differ from [`SpringTrainingArguments`]' so that
    both parse side by side."""

    data: str = field(
        default="",
        metadata={"help": "The user stream (JSONL of user_id, prompt, response, timestamp; or News / LaMP files)."},
    )
    data_format: str = field(default="auto", metadata={"help": "'auto', 'jsonl', 'news' or 'lamp'."})
    preset: str = field(
        default="auto",
        metadata={
            "help": "Task preset fixing the user message and how a history item is written, as in `spring train` "
            "('auto': 'news' for the News Category format, the LaMP task for LaMP files, else 'none')."
        },
    )
    lamp_outputs: str | None = field(default=None, metadata={"help": "LaMP outputs file (golds), if any."})
    lamp_task: str | None = field(default=None, metadata={"help": "LaMP / LongLaMP task, e.g. 'LaMP_7'."})
    lamp_queries: bool = field(
        default=False,
        metadata={
            "help": "Also read each LaMP question with its gold output as the user's latest item (needs golds): "
            "for LaMP-7, whose profile tweets are text-only and never validate, the questions are what validates."
        },
    )
    model: str = field(default="smollm2", metadata={"help": "'smollm2' or any causal LM id or path."})
    out: str = field(
        default="tuned.json",
        metadata={"help": "Where the chosen options are written; `spring train --config OUT` loads them unchanged."},
    )
    users: str = field(default="", metadata={"help": "Comma-separated user ids to tune on (default: every user)."})
    num_periods: int = field(
        default=5,
        metadata={
            "help": "Periods per user, as in `spring train`: adapters train on periods 0..P-2 and are judged on the "
            "items of period P-1 (the validation split) before any training on them. At least 2."
        },
    )
    min_items: int = field(
        default=0, metadata={"help": "Skip users with fewer interactions (0, the default: `num_periods`)."}
    )
    encoder: str = field(default="minilm", metadata={"help": "Memory encoder: 'minilm' or 'hashing'."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})
    learning_rates: str = field(default="1e-4,1e-3,3e-3", metadata={"help": "Grid of LoRA learning rates."})
    epochs: str = field(default="1,2", metadata={"help": "Grid of epochs per period."})
    selections: str = field(
        default="drift0.3,drift0.5,all",
        metadata={"help": f"Grid of sample selections: {SELECTION_FORMS}. Random selection is not offered."},
    )
    interpolation_weights: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "Grid of λ in [0, 1]."})
    gates: str = field(
        default="off,q0.75",
        metadata={"help": f"Grid of relevance gates: {GATE_FORMS} of the buffer BM25 scores of training prompts."},
    )
    top_ks: str = field(default="2,4", metadata={"help": "Grid of retrieved items per query."})
    regions: str = field(
        default="buffer,history", metadata={"help": "Grid of retrieval regions: buffer, history, all."}
    )
    copy_weights: str = field(
        default="0,0.1,0.3",
        metadata={
            "help": "Grid of the copy path's weight μ in [0, 1): probability moved onto tokens that continue spans of "
            "the input and of the user's retrieved responses (SpringConfig.copy_weight; docs/generation.md)."
        },
    )
    adaptive_weights: str = field(
        default="0,1,3",
        metadata={
            "help": "Grid of β of the per-token adaptive λ (SpringConfig.adaptive_weight; 0 = fixed λ): each β > 0 is "
            "tried for every λ strictly between 0 and 1, on the best retrieval and copy setting of the fixed λs."
        },
    )
    max_cost: float = field(
        default=3.0,
        metadata={
            "help": "Training budget of the search, in passes over the tuning users' training items (trained "
            "samples x epochs); successive halving stops before it would exceed it."
        },
    )
    rung_users: int = field(
        default=0, metadata={"help": "Users of the first halving rung (0: a third of the users, at least 1)."}
    )
    max_resident_adapters: int = field(default=8, metadata={"help": "Adapters kept loaded per candidate."})

    def __post_init__(self):
        check_stream_job(self, min_periods=2, hint="one period to train and one to validate on")
        check_choice(self.preset, "preset", PRESET_CHOICES)
        check_bool(self.lamp_queries, "lamp_queries")
        for name in ("lamp_outputs", "lamp_task"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"`{name}` must be a str or None, got {type(getattr(self, name)).__name__}.")
        check_int(self.rung_users, "rung_users", minimum=0, hint="0: a third of the users")
        check_float(self.max_cost, "max_cost", minimum=0.0, min_inclusive=False)
        self.grid()  # every grid parsed now: a bad value fails before anything is loaded

    @property
    def user_list(self) -> list[str]:
        """`users` as a list (empty: every user)."""
        return user_ids(self.users)

    @property
    def least_items(self) -> int:
        """The fewest interactions a user needs to be tuned on: one per period."""
        return self.min_items or self.num_periods

    def grid(self) -> dict[str, list[Any]]:
        """The parsed search space: `learning_rates`, `epochs`, `selections` (`(name, ratio)` pairs),
        `interpolation_weights`, `gates` (`(name, quantile or None)` pairs), `top_ks`, `regions`, `copy_weights`
        and `adaptive_weights`.

        Raises:
            `ValueError`: an empty grid or a value it cannot parse, naming the field.
        """
        lrs = [_number(v, "learning_rates") for v in _items(self.learning_rates, "learning_rates")]
        for lr in lrs:
            check_float(lr, "learning_rates", minimum=0.0, min_inclusive=False)
        epochs = [_number(v, "epochs") for v in _items(self.epochs, "epochs")]
        for value in epochs:
            check_float(value, "epochs", minimum=0.0, min_inclusive=False)
        weights = [_number(v, "interpolation_weights") for v in _items(self.interpolation_weights,
                                                                       "interpolation_weights")]  # fmt: skip
        for value in weights:
            check_float(value, "interpolation_weights", minimum=0.0, maximum=1.0)
        top_ks = []
        for text in _items(self.top_ks, "top_ks"):
            if not text.isdigit():
                raise ValueError(f"`top_ks`: {text!r} is not a positive integer.")
            top_ks.append(check_int(int(text), "top_ks", minimum=1))
        copy_weights = [_number(v, "copy_weights") for v in _items(self.copy_weights, "copy_weights")]
        for value in copy_weights:
            check_float(value, "copy_weights", minimum=0.0, maximum=1.0, max_inclusive=False)
        adaptive = [_number(v, "adaptive_weights") for v in _items(self.adaptive_weights, "adaptive_weights")]
        for value in adaptive:
            check_float(value, "adaptive_weights", minimum=0.0)
        regions = _items(self.regions, "regions")
        for region in regions:
            if region not in RETRIEVAL_REGIONS:
                raise ValueError(f"`regions`: unknown region {region!r}; use one of {list(RETRIEVAL_REGIONS)}.")
        return {
            "learning_rates": lrs,
            "epochs": epochs,
            "selections": [(text, parse_selection(text)) for text in _items(self.selections, "selections")],
            "interpolation_weights": weights,
            "gates": [(text, parse_gate(text)) for text in _items(self.gates, "gates")],
            "top_ks": top_ks,
            "regions": regions,
            "copy_weights": copy_weights,
            "adaptive_weights": adaptive,
        }
