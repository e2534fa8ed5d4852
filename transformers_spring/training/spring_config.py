"""`SpringTrainingArguments`: the SPRInG-specific settings on top of `transformers.TrainingArguments`."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from ..generation.config import MAX_TEMPLATE_CHARS, check_format_template
from ..persistence.adapter_checks import MAX_LORA_ALPHA, MAX_LORA_RANK
from ..utils.validation import check_choice, check_float, check_int

logger = logging.get_logger(__name__)

SCORE_REDUCTIONS = ("mean", "sum")
RESCORE_MODES = ("when_full", "always")
SCORING_DTYPES = ("bfloat16", "float16")

AUTO_LEARNING_RATE = "auto"

# The values `spring_preset` gives the fields a caller leaves unset (None); an explicit value always wins.
# "measured" follows the library's own evidence (docs/benchmark.md, the full run on the news stream with
# SmolLM2-135M-Instruct): the paper's lr 1e-4 was the worst point of the validation grid, 0.51 nats/token above the
# chosen 3e-3, and the drift top-30 % selection was no better than a random 30 % and worse than training on every
# sample (NLL +0.116 [+0.092, +0.140] against All-100 %); `spring tune` on the shipped news subset chose lr 3e-3,
# 2 epochs and selection "all". "auto" picks the learning rate per model (see `default_learning_rate`).
# "paper" is the paper's §5 (lr 1e-4 for a 4B model, top-30 % drift selection, 2 epochs).
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "measured": {"learning_rate": AUTO_LEARNING_RATE, "selection_ratio": 1.0, "num_train_epochs": 2.0},
    "paper": {"learning_rate": 1e-4, "selection_ratio": 0.3, "num_train_epochs": 2.0},
}

# The LoRA (r = 8 on the attention query/value projections) learning rate by base-model size: (models with fewer
# parameters than this, learning rate). Only the first row is measured by this library (SmolLM2-135M: the validation
# grid of docs/benchmark.md and `spring tune` on the news subset both chose 3e-3); the others are the conventional
# LoRA range for 1–3B and for larger models, not measured here.
LEARNING_RATE_BY_MODEL_SIZE: tuple[tuple[float, float], ...] = (
    (0.5e9, 3e-3),
    (3e9, 1e-3),
    (math.inf, 2e-4),
)


def count_model_parameters(model: torch.nn.Module) -> int:
    """The parameters of `model`'s base model: a `PeftModel`'s LoRA weights are not counted, tied weights count once,
    and a 4-bit quantized weight counts as the weights it packs (transformers' `num_parameters`).

    Args:
        model (`nn.Module`): a transformers model, or a `PeftModel` around one.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    counter = getattr(base, "num_parameters", None)
    total = counter() if callable(counter) else sum(p.numel() for p in base.parameters())
    # peft injects the LoRA layers into the base model itself: they are part of the count above.
    return int(total - sum(p.numel() for name, p in base.named_parameters() if "lora_" in name))


def default_learning_rate(model_or_num_params: torch.nn.Module | int) -> float:
    """The learning rate `learning_rate="auto"` falls back to: the [`LEARNING_RATE_BY_MODEL_SIZE`] row of the model's
    size (LoRA r = 8 on the attention query/value projections).

    | base model | learning rate | evidence |
    |---|---|---|
    | under 0.5B parameters | 3e-3 | measured: SmolLM2-135M on news headlines (docs/benchmark.md; `spring tune`) |
    | 0.5B to 3B | 1e-3 | not measured here: the conventional LoRA range |
    | 3B and more | 2e-4 | not measured here: the conventional LoRA range (the paper used 1e-4 on a 4B model) |

    Args:
        model_or_num_params (`nn.Module` or `int`): the model (a `PeftModel` counts its base model, see
            [`count_model_parameters`]) or its number of parameters.

    Returns:
        `float`: the learning rate.

    Raises:
        `TypeError` / `ValueError`: neither a module nor a positive int.
    """
    if isinstance(model_or_num_params, torch.nn.Module):
        num_params = count_model_parameters(model_or_num_params)
    else:
        num_params = check_int(model_or_num_params, "model_or_num_params", minimum=1)
    return next(rate for bound, rate in LEARNING_RATE_BY_MODEL_SIZE if num_params < bound)


def check_learning_rate(value: Any, name: str = "learning_rate") -> float | str:
    """A learning rate setting: `"auto"` or a positive finite float. A string holding a number (what a command-line
    parser passes on) becomes that float.

    Args:
        value (`Any`): the value.
        name (`str`, *optional*, defaults to `"learning_rate"`): the field's name, for the message.

    Returns:
        `"auto"` or a `float`.

    Raises:
        `ValueError`: another string, or a number that is not positive and finite. `TypeError`: another type.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == AUTO_LEARNING_RATE:
            return AUTO_LEARNING_RATE
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"`{name}` must be 'auto' or a positive finite float, got {value!r}.") from None
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be 'auto' or a positive finite float, got {type(value).__name__}.")
    return check_float(value, name, minimum=0.0, min_inclusive=False, hint="or 'auto'")


@dataclass
class SpringTrainingArguments(TrainingArguments):
    r"""
    Configuration of [`SpringTrainer`] and [`ContinualPersonalizer`]: SPRInG's drift-selective per-user LoRA updates
    with a residual replay buffer (paper Eq. 1–4, Algorithm 1). Every [`~transformers.TrainingArguments`] field works
    as usual. The learning rate, the selection ratio and the epochs come from a named preset unless you set them
    (`spring_preset`, see [`TRAINING_PRESETS`]): `"measured"` (the default) follows what this library's own benchmark
    measured, `"paper"` is the paper's §5. The other defaults follow the paper where it states them and the project's
    choices where it is silent.

    > The preset

        spring_preset (`str`, *optional*, defaults to `"measured"`):
            Where `learning_rate`, `selection_ratio` and `num_train_epochs` come from when they are not set.
            `"measured"`: `learning_rate="auto"`, `selection_ratio=1.0` (every sample), 2 epochs: on the news
            benchmark (docs/benchmark.md, SmolLM2-135M) the paper's lr 1e-4 was the worst point of the validation
            grid (0.51 nats/token above 3e-3), and the drift top-30 % was no better than a random 30 % and worse than
            training on every sample. `"paper"`: lr `1e-4`, `selection_ratio=0.3`, 2 epochs. Also
            [`~SpringTrainingArguments.from_preset`].
        learning_rate (`float` or `str`, *optional*):
            The peak AdamW learning rate, or `"auto"`: [`SpringTrainer`] then uses [`default_learning_rate`] for the
            model's size (3e-3 below 0.5B parameters, measured on SmolLM2-135M; 1e-3 below 3B and 2e-4 above, the
            conventional LoRA range), and [`ContinualPersonalizer`] first runs a small validation search on the first
            period-0 update with enough items (see its docstring). A plain [`~transformers.Trainer`] needs a float.
            Unset: the preset's (`"auto"` / `1e-4`).
        num_train_epochs (`float`, *optional*):
            Epochs per period; unset: the preset's (2 in both).

    Other parameters that differ from [`~transformers.TrainingArguments`] (paper defaults):
        weight_decay (`float`, *optional*, defaults to `0.01`), warmup_steps (`float`, *optional*, defaults to `0.1`:
        a ratio of the total steps, the v5 form of the paper's warmup ratio 0.1; rounded down, see
        [`~SpringTrainingArguments.get_warmup_steps`]), per_device_train_batch_size (`int`, *optional*, defaults to `4`), report_to (defaults to `"none"`),
        save_strategy (defaults to `"no"`: one trainer runs per user and period, so intermediate checkpoints are
        rarely wanted; [`ContinualPersonalizer.save_pretrained`] saves the state that matters), logging_steps
        (defaults to `10`), remove_unused_columns (defaults to `False`: the trainer's collator builds exactly the
        model inputs), ddp_find_unused_parameters (defaults to `False`: only the user's adapter trains, and all of it
        is used in every forward), dataloader_pin_memory (`bool`, *optional*: defaults to whether an accelerator is
        available; pinned memory only speeds up copies to one, and torch warns at every data loader without one).

    > Parameters that control drift selection (paper Eq. 1–2)

        selection_ratio (`float`, *optional*):
            Fraction of a period's new training samples kept for the update: the top `ceil(selection_ratio · n)` by
            drift score (the paper's top 30 %: `0.3`, the `"paper"` preset). `1.0` (the `"measured"` preset) trains on
            every sample (the "All-100 %" baseline) and skips the pre-update scoring; the residual buffer is still
            rebuilt: the pool (the period's samples ∪ the old buffer) is scored once, with the updated adapter, and
            its top `buffer_size` kept (Eq. 3–4). Period 0 always trains on all samples. Unset: the preset's.
        drift_alpha (`float`, *optional*, defaults to `1.0`):
            α in `S = −log(p_adap / p_base) + α · log p_base`: the weight of the quality term against the novelty
            term.
        score_reduction (`str`, *optional*, defaults to `"mean"`):
            How the per-token log-probabilities of a response are reduced to `log p`: `"mean"` (per token) or
            `"sum"`. The paper does not say; `"mean"` is the project default because with a sum and α = 1 the score
            mostly ranks samples by length (long responses have very negative `log p_base`).

    > Parameters that control the residual replay buffer (paper Eq. 3–4)

        buffer_size (`int`, *optional*, defaults to `50`):
            N_max, the most samples kept in a user's residual buffer (stored in the user's pinned region of a
            [`LoGoMemory`]). `0` disables the buffer.
        rescore_buffer (`str`, *optional*, defaults to `"when_full"`):
            When the candidate pool (selected samples ∪ old buffer) is re-scored with the updated adapter.
            `"when_full"`: only when it exceeds `buffer_size`, i.e. when Eq. 4 has to rank it; otherwise every
            candidate is kept and stores the latest score known for it. `"always"`: every period, as Algorithm 1's
            pseudo-code does. The buffer's contents are the same in both modes; only the stored scores and the cost
            differ.

    > Parameters that control the LoRA adapters (paper §5)

        lora_r (`int`, *optional*, defaults to `8`):
            LoRA rank.
        lora_alpha (`float`, *optional*, defaults to `8`):
            LoRA scaling numerator (`scale = lora_alpha / lora_r`).
        lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout on the LoRA input during training.
        lora_target_modules (`list[str]`, *optional*):
            Module names (or one regex) to adapt. Defaults to the attention query and value projections, detected
            per architecture by [`find_lora_target_modules`] (`q_proj`/`v_proj` for Llama, Qwen2, Mistral, Gemma…;
            `c_attn` for GPT-2; `query_key_value` for GPT-NeoX, Falcon, Bloom…).

    > Parameters that control the data preprocessing

        max_length (`int`, *optional*, defaults to `768`):
            Longest tokenized (prompt + response). Longer samples lose the start of their prompt; a response that is
            longer on its own is cut from the right, with a warning.
        prompt_template (`str`, *optional*, defaults to `"{prompt}"`):
            Turns an interaction into the user message; placeholders `{prompt}` and `{user_id}`. E.g.
            `"Write a headline for this news article: {prompt}"`.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            Format samples with the tokenizer's chat template when it has one (user turn = the prompt, assistant turn
            = the response), exactly as generation sees them. Without a chat template (or with `False`), a sample is
            `prompt_tokens + response_tokens + eos`.
        system_prompt (`str`, *optional*):
            An optional system message (chat template only).
        response_only_loss (`bool`, *optional*, defaults to `True`):
            Compute the training loss on response tokens only (the OPPU-style default). Drift scores always use
            response tokens only.
        scoring_batch_size (`int`, *optional*):
            Batch size of the drift-scoring forwards (no gradients); defaults to `per_device_eval_batch_size`.
        scoring_shared_prefix (`bool`, *optional*, defaults to `True`):
            Run the token prefix that all scored samples share (with a chat template: the system turn and the start
            of the user turn) once per scoring pass and reuse its KV cache, so only each sample's own tokens go
            through the model. Scores equal full forwards up to float rounding (about 1e-6); models whose cache is
            not plain full attention (sliding windows, linear attention) always run full forwards.
        scoring_dtype (`str`, *optional*):
            Run the scoring forwards under `torch.autocast` in `"bfloat16"` or `"float16"` (log-softmax stays in
            float32). `None` (default) scores in the model's own precision. Scoring has no backward pass, so low
            precision costs only score accuracy: on SmolLM2-135M and news data, bf16 moved drift scores by up to 0.12
            and changed the selection in 2 of 40 updates (see `docs/training.md`). The base log-prob cache does not
            record the precision: keep one setting per cache.
    """

    # --- preset
    spring_preset: str = field(
        default="measured",
        metadata={
            "help": "Where learning_rate, selection_ratio and num_train_epochs come from when not set: 'measured' "
            "(lr 'auto', every sample, 2 epochs: what the library's news benchmark supports) or 'paper' (lr 1e-4, "
            "drift top-30 percent, 2 epochs).",
            "choices": list(TRAINING_PRESETS),
        },
    )
    # --- drift selection
    selection_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of a period's new samples kept for training (top ceil(ratio * n) by drift score; 1.0: "
            "every sample, no pre-update scoring). None: the preset's ('measured': 1.0, 'paper': 0.3)."
        },
    )
    drift_alpha: float = field(
        default=1.0, metadata={"help": "α in S = -log(p_adap / p_base) + α log p_base (weight of the quality term)."}
    )
    score_reduction: str = field(
        default="mean",
        metadata={
            "help": "Reduction of response-token log-probs: 'mean' (per token, default) or 'sum'. The paper is silent; "
            "a sum ranks samples mostly by length.",
            "choices": list(SCORE_REDUCTIONS),
        },
    )
    # --- residual buffer
    buffer_size: int = field(default=50, metadata={"help": "N_max: most samples in a user's residual buffer."})
    rescore_buffer: str = field(
        default="when_full",
        metadata={
            "help": "Re-score the buffer candidates with the updated adapter 'when_full' (only when ranking is "
            "needed) or 'always'.",
            "choices": list(RESCORE_MODES),
        },
    )
    # --- LoRA
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt; default: the attention query/value projections, detected per model."},
    )
    # --- data
    max_length: int = field(
        default=768, metadata={"help": "Longest prompt + response in tokens (the prompt is cut from the left)."}
    )
    prompt_template: str = field(
        default="{prompt}",
        metadata={"help": "User message built from an interaction; placeholders {prompt}, {user_id}."},
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "Use the tokenizer's chat template when it has one."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message (chat template only)."})
    response_only_loss: bool = field(default=True, metadata={"help": "Train on response tokens only."})
    scoring_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of drift scoring; defaults to per_device_eval_batch_size."}
    )
    scoring_shared_prefix: bool = field(
        default=True,
        metadata={"help": "Compute the token prefix shared by all scored samples once and reuse its KV cache."},
    )
    scoring_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Autocast precision of the scoring forwards ('bfloat16' or 'float16'); default: the model's own.",
            "choices": list(SCORING_DTYPES),
        },
    )

    # --- inherited fields: from the preset (None) or the paper's defaults
    learning_rate: float | str | None = field(
        default=None,
        metadata={
            "help": "Peak AdamW learning rate: a float, or 'auto' (a validation search on the first period-0 update "
            "with enough items, else a default for the model's size: 3e-3 below 0.5B parameters, 1e-3 below 3B, 2e-4 "
            "above). None: the preset's ('measured': auto, 'paper': 1e-4)."
        },
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup: steps (int) or a ratio of total steps in [0, 1) (paper: 0.1)."}
    )
    num_train_epochs: float | None = field(
        default=None, metadata={"help": "Epochs per period. None: the preset's (2 in 'measured' and 'paper')."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device (paper: 4)."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Integrations to report to ('none' by default)."}
    )
    save_strategy: str = field(
        default="no", metadata={"help": "Trainer checkpointing per period; 'no' by default (see the docstring)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the SPRInG collator builds exactly the model inputs."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's unused-parameter search; off because only the user's adapter trains and all of it is used "
            "in every forward (set True for targets that some forwards skip, e.g. MoE experts)."
        },
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Pin DataLoader memory; default: True when an accelerator (CUDA, XPU, MPS...) is available.",
            # HfArgumentParser gives a None-default bool no bare-flag form: `--dataloader_pin_memory` alone means True.
            "nargs": "?",
            "const": True,
        },
    )

    def __post_init__(self):
        self._apply_preset()
        self._check_spring_fields()
        if self.dataloader_pin_memory is None:
            # Not set by the caller. Without an accelerator, pinning does nothing but make torch's DataLoader warn
            # "'pin_memory' argument is set as true but no accelerator is found" at every trainer run; torch's
            # own test (`torch.accelerator`, torch >= 2.6) decides.
            self.dataloader_pin_memory = torch.accelerator.is_available()
        super().__post_init__()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> SpringTrainingArguments:
        """Arguments with the preset `name`'s learning rate, selection ratio and epochs; `kwargs` set any field (an
        explicit `learning_rate`, ... wins over the preset).

        Args:
            name (`str`): a key of [`TRAINING_PRESETS`]: `"measured"` or `"paper"`.
            kwargs: other fields (`output_dir`, `buffer_size`, ...).

        Example:

        ```python
        >>> args = SpringTrainingArguments.from_preset("paper", output_dir="out")
        >>> args.learning_rate, args.selection_ratio
        (0.0001, 0.3)
        ```
        """
        check_choice(name, "name", tuple(TRAINING_PRESETS))
        given = kwargs.pop("spring_preset", name)
        if given != name:
            raise ValueError(f"`spring_preset` is {given!r} but the preset asked for is {name!r}.")
        return cls(spring_preset=name, **kwargs)

    def _apply_preset(self) -> None:
        """Fills the fields left unset (None) from `spring_preset`, then checks the learning rate."""
        check_choice(self.spring_preset, "spring_preset", tuple(TRAINING_PRESETS))
        for name, value in TRAINING_PRESETS[self.spring_preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.learning_rate = check_learning_rate(self.learning_rate)

    def with_learning_rate(self, learning_rate: float) -> SpringTrainingArguments:
        """A copy whose `learning_rate` is the float `learning_rate` (what `"auto"` resolved to).

        A shallow copy, not a new instance: building a `TrainingArguments` re-initialises accelerate's process state,
        which breaks a distributed run once a trainer exists.

        Args:
            learning_rate (`float`): a positive finite learning rate.
        """
        resolved = copy.copy(self)
        resolved.learning_rate = check_float(learning_rate, "learning_rate", minimum=0.0, min_inclusive=False)
        return resolved

    def _check_spring_fields(self) -> None:
        for name, check, requirement in _FIELD_CHECKS:
            check(getattr(self, name), name, **requirement)
        targets = self.lora_target_modules
        if isinstance(targets, tuple):
            self.lora_target_modules = targets = list(targets)
        if targets is not None and not (
            isinstance(targets, str)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))
        ):
            raise ValueError(
                f"`lora_target_modules` must be None, a regex string or a non-empty list of module names, got {targets!r}."
            )
        # Parsed, not formatted with the real values: a saved `training_args.json` may hold `{prompt:>3000000000}`.
        check_format_template(self.prompt_template, "prompt_template", ("prompt", "user_id"), required="prompt")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"`system_prompt` must be a str or None, got {type(self.system_prompt).__name__}.")
        if self.system_prompt is not None and len(self.system_prompt) > MAX_TEMPLATE_CHARS:
            # Sent verbatim (never formatted), but tokenized with every sample: bounded like a template.
            raise ValueError(
                f"`system_prompt` is {len(self.system_prompt)} characters long, above the limit of {MAX_TEMPLATE_CHARS}."
            )

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps; a ratio in [0, 1) is rounded **down** (transformers rounds up).

        SPRInG trains each user on a handful of selected samples per period, often a few optimizer steps. With a
        linear warmup the first step has learning rate 0, so rounding 10 % of 2 steps up to one warmup step would waste
        half of the update. Rounding down gives the paper's ratio for long runs (±1 step) and no warmup below 10 steps.
        """
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return int(math.floor(num_training_steps * self.warmup_steps + 1e-9))

    @property
    def effective_scoring_batch_size(self) -> int:
        """The batch size of drift-scoring forwards."""
        return self.scoring_batch_size or self.per_device_eval_batch_size

    def spring_dict(self) -> dict:
        """The SPRInG-specific fields (what [`ContinualPersonalizer`] records next to the adapters)."""
        return {name: getattr(self, name) for name in SPRING_FIELDS}


# The bounded and multiple-choice SPRInG fields, checked in this order: (field, kind, valid, requirement). Kinds
# "number", "int" and "int_or_none" first raise a TypeError for another type and a ValueError for inf/nan; then an
# invalid value raises "`<field>` must be <requirement>, got <value>.".
_FIELD_CHECKS: tuple[tuple[str, Callable[..., Any], dict[str, Any]], ...] = (
    ("selection_ratio", check_float, {"minimum": 0.0, "maximum": 1.0, "min_inclusive": False}),
    ("drift_alpha", check_float, {"minimum": 0.0}),
    ("score_reduction", check_choice, {"choices": SCORE_REDUCTIONS}),
    ("buffer_size", check_int, {"minimum": 0}),
    ("rescore_buffer", check_choice, {"choices": RESCORE_MODES}),
    # The adapter validator's bounds (a `training_args.json` from a folder must not allocate without limit either).
    ("lora_r", check_int, {"minimum": 1, "maximum": MAX_LORA_RANK}),
    ("lora_alpha", check_float, {"minimum": 0.0, "min_inclusive": False, "maximum": MAX_LORA_ALPHA}),
    ("lora_dropout", check_float, {"minimum": 0.0, "maximum": 1.0, "max_inclusive": False}),
    ("max_length", check_int, {"minimum": 2, "hint": "one prompt and one response token"}),
    ("scoring_batch_size", check_int, {"minimum": 1, "optional": True}),
    ("scoring_dtype", check_choice, {"choices": (None, *SCORING_DTYPES)}),
)

# The SPRInG-specific fields: those `TrainingArguments` does not have, in declaration order.
SPRING_FIELDS = tuple(
    f.name for f in fields(SpringTrainingArguments) if f.name not in {g.name for g in fields(TrainingArguments)}
)
