"""`SpringTrainingArguments`: the SPRInG-specific settings on top of `transformers.TrainingArguments`."""

from __future__ import annotations

import math
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


@dataclass
class SpringTrainingArguments(TrainingArguments):
    r"""
    Configuration of [`SpringTrainer`] and [`ContinualPersonalizer`]: SPRInG's drift-selective per-user LoRA updates
    with a residual replay buffer (paper Eq. 1–4, Algorithm 1). Every [`~transformers.TrainingArguments`] field works
    as usual; the defaults below follow the paper (§5) where it states them and the project's choices where it is
    silent.

    Parameters that differ from [`~transformers.TrainingArguments`] (paper defaults):
        learning_rate (`float`, *optional*, defaults to `1e-4`), weight_decay (`float`, *optional*, defaults to
        `0.01`), warmup_steps (`float`, *optional*, defaults to `0.1`: a ratio of the total steps, the v5 form of the
        paper's warmup ratio 0.1; rounded down, see [`~SpringTrainingArguments.get_warmup_steps`]), num_train_epochs (`float`, *optional*, defaults to `2`),
        per_device_train_batch_size (`int`, *optional*, defaults to `4`), report_to (defaults to `"none"`),
        save_strategy (defaults to `"no"`: one trainer runs per user and period, so intermediate checkpoints are
        rarely wanted; [`ContinualPersonalizer.save_pretrained`] saves the state that matters), logging_steps
        (defaults to `10`), remove_unused_columns (defaults to `False`: the trainer's collator builds exactly the
        model inputs), ddp_find_unused_parameters (defaults to `False`: only the user's adapter trains, and all of it
        is used in every forward), dataloader_pin_memory (`bool`, *optional*: defaults to whether an accelerator is
        available; pinned memory only speeds up copies to one, and torch warns at every data loader without one).

    > Parameters that control drift selection (paper Eq. 1–2)

        selection_ratio (`float`, *optional*, defaults to `0.3`):
            Fraction of a period's new training samples kept for the update: the top `ceil(selection_ratio · n)` by
            drift score (the paper's top 30 %). `1.0` trains on everything (the "All-100 %" baseline) and skips
            scoring. Period 0 always trains on all samples.
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

    # --- drift selection
    selection_ratio: float = field(
        default=0.3,
        metadata={
            "help": "Fraction of a period's new samples kept for training (top ceil(ratio * n) by drift score)."
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

    # --- paper defaults for inherited fields
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW (paper: 1e-4)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup: steps (int) or a ratio of total steps in [0, 1) (paper: 0.1)."}
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs per period (paper: 2)."})
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
        self._check_spring_fields()
        if self.dataloader_pin_memory is None:
            # Not set by the caller. Without an accelerator, pinning does nothing but make torch's DataLoader warn
            # "'pin_memory' argument is set as true but no accelerator is found" at every trainer run; torch's
            # own test (`torch.accelerator`, torch >= 2.6) decides.
            self.dataloader_pin_memory = torch.accelerator.is_available()
        super().__post_init__()

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
