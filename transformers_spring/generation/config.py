"""Configuration of SPRInG's gated dual-path decoding (paper §3 Eq. 5–8, §4 Algorithm 2)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

SPRING_CONFIG_NAME = "spring_config.json"

GENERATION_MODES = ("fused", "processor")
PENALTY_MODES = ("per_path", "mixture")
CHAT_INSERTION_MODES = ("auto", "prefix")


@dataclass
class SpringConfig:
    r"""
    Configuration of [`SpringForCausalLM`]: how a user's retrieved history is turned into a second decoding path and
    how that path is mixed into the parametric one.

    Both paths run the same (adapted) model. At each step the next-token distribution is
    `p = λ · p(· | history, prompt) + (1 − λ) · p(· | prompt)` (a mixture of *probabilities*, paper Eq. 8); the chosen
    token is appended to both paths. When the relevance gate leaves no history for a row, that row decodes with the
    parametric path alone and no second forward is run for it.

    Args:
        interpolation_weight (`float`, *optional*, defaults to 0.5):
            λ, the weight of the history-conditioned path, in `[0, 1]`. 0 means plain generation, 1 means generation
            with the history in the prompt.
        use_memory_weight (`bool`, *optional*, defaults to `False`):
            Use the λ suggested by the memory's mediator (`MediatedContext.weight`) instead of
            `interpolation_weight`. The paper keeps λ fixed, hence the default.
        top_k (`int`, *optional*, defaults to 2):
            How many items to retrieve per query (the paper's k = 2).
        gate (`float` or `str`, *optional*, defaults to `"auto"`):
            The relevance gate. `"auto"` trusts the gate the memory already applied (configure it on the memory, e.g.
            `LoGoMemory(gate="auto")`). A float additionally drops every retrieved item whose score is not strictly
            above it (paper Eq. 5).
        use_global (`bool`, *optional*, defaults to `True`):
            Whether the memory may add items from other users (LoGo's global memory).
        retrieval_template (`str`, *optional*):
            How the rendered history is written before the prompt; must contain `{history}`.
        history_item_template (`str`, *optional*, defaults to `"{prompt}\n{response}"`):
            How one retrieved interaction is rendered. Placeholders: `{prompt}`, `{response}`, `{text}`, `{user_id}`,
            `{source}`, `{score}`.
        history_separator (`str`, *optional*, defaults to `"\n\n"`):
            Put between rendered items.
        chat_insertion (`str`, *optional*, defaults to `"auto"`):
            Where the history goes in the token sequence. `"auto"`: when the tokenizer has a chat template, at the
            start of the last user message's content (so the system prompt and turn markers stay where the model
            expects them); otherwise, and when no user turn is found, at the start of the prompt (after BOS).
            `"prefix"`: always at the start of the prompt.
        max_history_tokens (`int`, *optional*, defaults to 512):
            Budget for the rendered history block, template included. Items are added in retrieval order while they
            fit; a first item that does not fit alone is cut.
        mode (`str`, *optional*, defaults to `"fused"`):
            `"fused"`: both paths in one batched forward per step (a `custom_generate` decoding loop).
            `"processor"`: plain `generate` with a [`RetrievalInterpolationLogitsProcessor`] running a serial second
            forward. Both give the same tokens.
        penalty_mode (`str`, *optional*, defaults to `"per_path"`):
            Where `repetition_penalty` applies. `"per_path"`: to each path's logits, over that path's own sequence,
            before the mixture (paper open question #10). `"mixture"`: once, on the log of the mixture.
        early_exit_epsilon (`float`, *optional*, defaults to 0.0):
            ε of the early exit (the paper's future work): once the Jensen–Shannon divergence (nats) between the two
            paths stays below ε for `early_exit_patience` consecutive steps, the row stops computing its history path
            and continues with the parametric path alone. 0 turns the early exit off.
        early_exit_patience (`int`, *optional*, defaults to 4):
            m, the number of consecutive low-divergence steps before a row exits.
        skinny_cpu_linear (`bool`, *optional*, defaults to `True`):
            Fused mode on CPU: compute the linear layers of each decoding step (`B + R` ≤ 8 rows) as `W · xᵀ`
            ([`skinny_cpu_linear`]). PyTorch's default kernel for a few rows costs ~1.5x one row on CPU; this one
            about 1x, which is most of the fused mode's overhead at batch 1. Results match the default kernel up to
            rounding. No effect on GPU or for half-precision weights.
        adapter_name_template (`str`, *optional*, defaults to `"{user_id}"`):
            The name of a user's LoRA adapter in the wrapped (peft) model. A name with the user id's characters
            outside `[A-Za-z0-9_-]` replaced by `_` is tried too; users without an adapter decode with the base
            model.
        base_model_name_or_path (`str`, *optional*):
            The wrapped model's id or path; filled in by `save_pretrained` and used by `from_pretrained`.
    """

    interpolation_weight: float = field(
        default=0.5, metadata={"help": "λ: weight of the history-conditioned path in the probability mixture."}
    )
    use_memory_weight: bool = field(
        default=False, metadata={"help": "Use the memory mediator's suggested λ instead of interpolation_weight."}
    )
    top_k: int = field(default=2, metadata={"help": "Number of items to retrieve per query."})
    gate: float | str = field(
        default="auto",
        metadata={"help": "'auto' = the memory's own gate; a float = keep only items with score > gate."},
    )
    use_global: bool = field(default=True, metadata={"help": "Let the memory add items from other users."})
    retrieval_template: str = field(
        default="Here is what this user wrote before:\n\n{history}\n\n",
        metadata={"help": "Wraps the rendered history; must contain '{history}'."},
    )
    history_item_template: str = field(
        default="{prompt}\n{response}", metadata={"help": "Renders one retrieved interaction."}
    )
    history_separator: str = field(default="\n\n", metadata={"help": "Separator between rendered items."})
    chat_insertion: str = field(
        default="auto",
        metadata={"help": "'auto' = start of the last user message if a chat template is found, else 'prefix'."},
    )
    max_history_tokens: int = field(default=512, metadata={"help": "Token budget of the history block."})
    mode: str = field(default="fused", metadata={"help": "'fused' (one batched forward) or 'processor' (serial)."})
    penalty_mode: str = field(
        default="per_path", metadata={"help": "'per_path' (before the mix) or 'mixture' (on the mixed log-probs)."}
    )
    early_exit_epsilon: float = field(
        default=0.0, metadata={"help": "JS-divergence threshold (nats) of the early exit; 0 disables it."}
    )
    early_exit_patience: int = field(
        default=4, metadata={"help": "Consecutive low-divergence steps before a row drops its history path."}
    )
    skinny_cpu_linear: bool = field(
        default=True, metadata={"help": "Fused mode on CPU: linear layers on 2-8 rows computed as W @ x.T (faster)."}
    )
    adapter_name_template: str = field(
        default="{user_id}", metadata={"help": "Name of a user's LoRA adapter in the wrapped model."}
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "The wrapped model's id or path."})

    def __post_init__(self):
        check_weight(self.interpolation_weight, "interpolation_weight")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"`top_k` must be a positive int, got {self.top_k!r}.")
        self.gate = check_gate(self.gate, "gate")
        if "{history}" not in self.retrieval_template:
            raise ValueError(f"`retrieval_template` must contain '{{history}}', got {self.retrieval_template!r}.")
        try:
            self.history_item_template.format(prompt="", response="", text="", user_id="", source="", score=0.0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"`history_item_template` {self.history_item_template!r} uses an unknown placeholder: {err}. Allowed: "
                "{prompt}, {response}, {text}, {user_id}, {source}, {score}."
            ) from err
        if self.chat_insertion not in CHAT_INSERTION_MODES:
            raise ValueError(f"`chat_insertion` must be one of {CHAT_INSERTION_MODES}, got {self.chat_insertion!r}.")
        if not isinstance(self.max_history_tokens, int) or self.max_history_tokens < 1:
            raise ValueError(f"`max_history_tokens` must be a positive int, got {self.max_history_tokens!r}.")
        if self.mode not in GENERATION_MODES:
            raise ValueError(f"`mode` must be one of {GENERATION_MODES}, got {self.mode!r}.")
        if self.penalty_mode not in PENALTY_MODES:
            raise ValueError(f"`penalty_mode` must be one of {PENALTY_MODES}, got {self.penalty_mode!r}.")
        check_early_exit(self.early_exit_epsilon, self.early_exit_patience)
        if not isinstance(self.skinny_cpu_linear, bool):
            raise TypeError(f"`skinny_cpu_linear` must be a bool, got {type(self.skinny_cpu_linear).__name__}.")
        if "{user_id}" not in self.adapter_name_template:
            raise ValueError(
                f"`adapter_name_template` must contain '{{user_id}}', got {self.adapter_name_template!r}."
            )

    # ----------------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpringConfig:
        """Builds a config from a dict, ignoring (with a warning) keys written by a newer version."""
        if not isinstance(data, dict):
            raise TypeError(f"a SpringConfig must be built from a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"spring_config_version"})
        if unknown:
            logger.warning(f"Ignoring unknown SpringConfig field(s) {unknown}.")
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_json_string(self) -> str:
        return json.dumps({"spring_config_version": 1, **self.to_dict()}, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SpringConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes `spring_config.json` into `save_directory` and returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, SPRING_CONFIG_NAME)
        self.to_json_file(path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SpringConfig:
        """Reads `spring_config.json` from a local directory."""
        path = os.path.join(directory, SPRING_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {SPRING_CONFIG_NAME} in {directory!r}.")
        return cls.from_json_file(path)


def check_weight(value: Any, name: str) -> float:
    """Validates an interpolation weight λ: a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` (λ) must be a float in [0, 1], got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` (λ) must be in [0, 1], got {value}.")
    return value


def check_gate(value: Any, name: str) -> float | str:
    """Validates a gate: `"auto"` or a finite float threshold."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"`{name}` must be 'auto' or a float threshold, got {value!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be 'auto' or a finite float threshold, got {value!r}.")
    return float(value)


def check_early_exit(epsilon: Any, patience: Any) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0 or math.isinf(epsilon):
        raise ValueError(f"`early_exit_epsilon` must be a finite float >= 0 (0 disables it), got {epsilon!r}.")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"`early_exit_patience` must be an int >= 1, got {patience!r}.")
