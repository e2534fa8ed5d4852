"""Configuration of SPRInG's gated dual-path decoding (paper §3 Eq. 5–8, §4 Algorithm 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from ..utils.validation import check_bool, check_choice, check_float, check_int
from .adapters import check_adapter_name_template
from .copying import check_copy_weight, parse_copy_sources

logger = logging.get_logger(__name__)

SPRING_CONFIG_NAME = "spring_config.json"

GENERATION_MODES = ("fused", "processor")
PENALTY_MODES = ("per_path", "mixture")
CHAT_INSERTION_MODES = ("auto", "prefix")
RETRIEVAL_REGIONS = ("all", "history", "buffer")
UNKNOWN_USER_POLICIES = ("base", "error")
# Template checks (see `check_format_template`): a template comes from a saved file as often as from code, and
# `"{prompt:>3000000000}"` would allocate gigabytes each time it is formatted. No real template pads a field wider.
MAX_TEMPLATE_FIELD_WIDTH = 1000
# Longer than any real prompt or history template; spares the parse of a hostile megabyte string.
MAX_TEMPLATE_CHARS = 100_000
HISTORY_ITEM_FIELDS = ("prompt", "response", "text", "user_id", "source", "score")
_SPEC_NUMBERS = re.compile(r"\d+")
# The decoding settings a field left unset takes: `SpringConfig()` decodes with "measured", and the SPRInG paper's
# settings stay one word away (`SpringConfig(spring_preset="paper")`). Why "measured" differs: on the full news benchmark
# (docs/benchmark.md) the paper's λ = 0.5 bought −0.011 nats/token over the adapter alone and cost ROUGE-L, and
# `spring tune` chose λ = 0.25 on the news subset's validation split (docs/training.md); retrieval from the whole
# stream ("all") rather than the buffer alone, because the tuner preferred the history to the buffer. (The tuner's
# choice there was k = 4 from the history; k stays at the paper's 2, so this exact combination is not one it scored.)
DECODING_PRESETS: dict[str, dict[str, Any]] = {
    "measured": {"interpolation_weight": 0.25, "top_k": 2, "retrieval_region": "all"},
    "paper": {"interpolation_weight": 0.5, "top_k": 2, "retrieval_region": "buffer"},
}


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
        interpolation_weight (`float`, *optional*, defaults to 0.25):
            λ, the weight of the history-conditioned path, in `[0, 1]`. 0 means plain generation, 1 means generation
            with the history in the prompt. Unset, it is the preset's: 0.25 (measured), 0.5 (paper).
        use_memory_weight (`bool`, *optional*, defaults to `False`):
            Use the λ suggested by the memory's mediator (`MediatedContext.weight`) instead of
            `interpolation_weight`. The paper keeps λ fixed, hence the default.
        top_k (`int`, *optional*, defaults to 2):
            How many items to retrieve per query (the paper's k = 2, in both presets).
        gate (`float`, *optional*):
            σ of the decoding call's relevance gate (paper Eq. 5): only the *local* retrieved items whose score is
            strictly above it are kept; global items, weighed by the mediator, pass. `None` (the default) adds no gate
            to the memory's own (`LoGoMemory(gate=...)`, where `"auto"` is an online quantile of observed scores).
            Saved configs of earlier releases with `"auto"` here load as `None`, which is what it meant.
        use_global (`bool`, *optional*, defaults to `True`):
            Whether the memory may add items from other users (LoGo's global memory).
        retrieval_region (`str`, *optional*, defaults to `"all"`):
            Where the user's own items are retrieved from: `"all"`, `"history"` or `"buffer"` (SPRInG's residual
            buffer, the paper's retrieval source). Passed to the memory as `region=` unless `"all"`. Unset, it is the
            preset's: `"all"` (measured), `"buffer"` (paper).
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
            The name of a user's LoRA adapter in the wrapped (peft) model: the template filled with the user id, whose
            characters outside `[A-Za-z0-9_-]` are replaced by `_` ([`adapter_name_for`], the one naming rule).
            Users without an adapter decode with the base model. `ContinualPersonalizer.to_spring_model` sets it
            to the personalizer's own and refuses a config that differs.
        base_model_name_or_path (`str`, *optional*):
            The wrapped model's id or path; filled in by `save_pretrained` and used by `from_pretrained`.
        unknown_user (`str`, *optional*, defaults to `"base"`):
            What a personalized row of an *unknown* user does: one without an adapter in the model whom the memory
            holds no record of (a typo such as `"Ed Mazza "` for `"Ed Mazza"` is the usual cause). `"base"`: decode
            with the base model, logged once per user at info level. `"error"`: raise a `ValueError` naming the user,
            the adapter and memory looked in, and close matches among the known users. A memory that cannot list its
            users (no `users`) is taken to know them all.
        copy_weight (`float`, *optional*, defaults to 0.0):
            μ, the weight of the copy path (see `generation/copying.py`), in `[0, 1)`:
            `p = (1 − μ) · p_spring + μ · p_copy`, where `p_copy` continues spans of the row's copy sources. Applies
            to personalized rows only, at steps where `p_copy` is defined. 0 (the default) turns it off: decoding is
            then exactly what it is without the copy path. Choose μ on validation data.
        copy_max_ngram (`int`, *optional*, defaults to 4):
            The longest context the copy path matches in its sources (backing off to shorter ones), ≥ 1.
        copy_sources (`str`, *optional*, defaults to `"input,history"`):
            The copy path's sources, comma-separated: `"input"` (the row's prompt, without the history block) and
            `"history"` (the responses of the row's retrieved history items, tokenized without special tokens).
        adaptive_weight (`float`, *optional*, defaults to 0.0):
            β of the per-token adaptive λ: at each token `λ_t = σ(logit λ + β · (H_param − H_hist))`, where `H` is the
            entropy (nats) of each path's next-token distribution, so the more confident path weighs more. 0 (the
            default) keeps λ fixed (decoding is then exactly what it is without the option); λ = 0 and λ = 1 stay
            fixed whatever β. Choose β on validation data (`spring tune`'s `adaptive_weights`).
        spring_preset (`str`, *optional*, defaults to `"measured"`):
            Where `interpolation_weight`, `top_k` and `retrieval_region` come from when left unset
            ([`DECODING_PRESETS`]): `"measured"` (what the library's benchmark and tuner found best on the news
            stream: λ = 0.25) or `"paper"` (the SPRInG paper's: λ = 0.5, k = 2 from the residual buffer). A value
            you pass always wins. `spring tune` chooses all of them on your own data. Named as
            [`SpringTrainingArguments.spring_preset`], the training half of the same two presets.
    """

    interpolation_weight: float | None = field(
        default=None,
        metadata={"help": "λ: weight of the history-conditioned path in the mixture (unset: the preset's, 0.25)."},
    )
    use_memory_weight: bool = field(
        default=False, metadata={"help": "Use the memory mediator's suggested λ instead of interpolation_weight."}
    )
    top_k: int | None = field(default=None, metadata={"help": "Items to retrieve per query (unset: the preset's, 2)."})
    gate: float | None = field(
        default=None,
        metadata={"help": "σ: keep only local retrieved items scored > gate; None = the memory's own gate alone."},
    )
    use_global: bool = field(default=True, metadata={"help": "Let the memory add items from other users."})
    retrieval_region: str | None = field(
        default=None,
        metadata={"help": "Retrieve the user's own items from 'all', 'history' or 'buffer' (unset: the preset's)."},
    )
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
    unknown_user: str = field(
        default="base",
        metadata={"help": "Users with no adapter and no memory records: 'base' (base model, logged) or 'error'."},
    )
    copy_weight: float = field(
        default=0.0, metadata={"help": "μ: weight of the copy path (spans of the input / past responses); 0 = off."}
    )
    copy_max_ngram: int = field(default=4, metadata={"help": "Longest context the copy path matches (>= 1)."})
    copy_sources: str = field(
        default="input,history", metadata={"help": "The copy path's sources: comma list of 'input', 'history'."}
    )
    adaptive_weight: float = field(
        default=0.0,
        metadata={"help": "β of the per-token adaptive λ from the two paths' entropies; 0 = fixed λ."},
    )
    spring_preset: str = field(
        default="measured",
        metadata={"help": "Defaults of the unset λ, top_k and region: 'measured' (the library's) or 'paper'."},
    )

    def __post_init__(self):
        check_choice(self.spring_preset, "spring_preset", tuple(DECODING_PRESETS))
        for name, value in DECODING_PRESETS[self.spring_preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_weight(self.interpolation_weight, "interpolation_weight")
        self.top_k = check_int(self.top_k, "top_k", minimum=1)
        if self.gate == "auto":  # spring_config.json of releases <= 0.x: "auto" meant "the memory's gate alone"
            self.gate = None
        self.gate = check_gate(self.gate, "gate")
        check_choice(self.retrieval_region, "retrieval_region", RETRIEVAL_REGIONS)
        check_format_template(self.retrieval_template, "retrieval_template", ("history",), required="history")
        check_format_template(self.history_item_template, "history_item_template", HISTORY_ITEM_FIELDS)
        check_choice(self.chat_insertion, "chat_insertion", CHAT_INSERTION_MODES)
        self.max_history_tokens = check_int(self.max_history_tokens, "max_history_tokens", minimum=1)
        check_choice(self.mode, "mode", GENERATION_MODES)
        check_choice(self.penalty_mode, "penalty_mode", PENALTY_MODES)
        check_early_exit(self.early_exit_epsilon, self.early_exit_patience)
        check_bool(self.skinny_cpu_linear, "skinny_cpu_linear")
        check_adapter_name_template(self.adapter_name_template)
        check_choice(self.unknown_user, "unknown_user", UNKNOWN_USER_POLICIES)
        self.copy_weight = check_copy_weight(self.copy_weight, "copy_weight")
        self.copy_max_ngram = check_int(self.copy_max_ngram, "copy_max_ngram", minimum=1)
        parse_copy_sources(self.copy_sources, "copy_sources")
        self.adaptive_weight = check_adaptive_weight(self.adaptive_weight, "adaptive_weight")

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
        from ..persistence.folder import atomic_write_text

        atomic_write_text(path, self.to_json_string())  # a crash never leaves a half-written config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SpringConfig:
        """Reads a config file, refusing one above [`~persistence.json_files.MAX_SPRING_CONFIG_BYTES`] before
        parsing it (the file may come from a folder someone else wrote)."""
        from ..persistence.json_files import MAX_SPRING_CONFIG_BYTES, read_json_capped

        data = read_json_capped(path, MAX_SPRING_CONFIG_BYTES)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object.")
        return cls.from_dict(data)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs,
    ) -> Any:
        """Writes `spring_config.json` into `save_directory`, then pushes it to the Hub when `push_to_hub`.

        Args:
            save_directory (`str` or `os.PathLike`): the folder (created if needed).
            push_to_hub (`bool`, *optional*, defaults to `False`): also upload the config, in one commit, to `repo_id`.
            repo_id (`str`, *optional*): the repo to push to; defaults to the name of `save_directory`.
            push_kwargs: passed to [`~persistence.hub.push_folder`] (`private`, `token`, `commit_message`,
                `revision`, `create_pr`).

        Returns:
            `str`: the path of the written file; the `CommitInfo` of the upload when `push_to_hub`.

        Raises:
            `TypeError`: `push_kwargs` holds a name `push_folder` does not take (checked before anything is written).
        """
        import inspect

        from ..persistence.hub import push_folder

        # Checked first: a typo must not cost a save, nor be silently dropped.
        repo_id = repo_id or os.path.basename(os.path.abspath(save_directory))
        inspect.signature(push_folder).bind(None, repo_id, **push_kwargs)
        if push_kwargs and not push_to_hub:
            logger.warning(f"{sorted(push_kwargs)} are ignored: `push_to_hub` is False.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, SPRING_CONFIG_NAME)
        self.to_json_file(path)
        if push_to_hub:
            return push_folder(lambda folder: self.save_pretrained(folder), repo_id, **push_kwargs)
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> SpringConfig:
        """Reads `spring_config.json` from a local folder or a Hub repo (only that file is downloaded).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder (e.g. a saved `SpringForCausalLM` or
                `ContinualPersonalizer`) or a Hub repo id.
            revision (`str`, *optional*): the repo revision.
            token (`str` or `bool`, *optional*): the Hub token.
            cache_dir (`str` or `os.PathLike`, *optional*): the Hub cache.
            local_files_only (`bool`, *optional*, defaults to `False`): only read the Hub cache.
            force_download (`bool`, *optional*, defaults to `False`): download again even when cached.

        Raises:
            `FileNotFoundError`: no such folder or repo, or it has no `spring_config.json`.
        """
        from ..persistence.hub import resolve_folder

        folder = resolve_folder(
            pretrained_model_name_or_path,
            marker=SPRING_CONFIG_NAME,
            kind="SpringConfig",
            allow_patterns=[SPRING_CONFIG_NAME],
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        path = folder / SPRING_CONFIG_NAME
        if not path.is_file():  # a repo without one: the snapshot downloaded nothing
            raise FileNotFoundError(f"no {SPRING_CONFIG_NAME} in {pretrained_model_name_or_path!r}.")
        return cls.from_json_file(path)


def check_format_template(template: Any, name: str, allowed: tuple[str, ...], *, required: str | None = None) -> str:
    """Validates a `str.format` template without formatting it with its real values: it is parsed with
    `string.Formatter().parse`, and every replacement field must be one of `allowed` by plain name (no positional
    field, attribute or index access, no `!r`/`!s`/`!a` conversion), with a format spec that holds no nested field
    and no width or precision above [`MAX_TEMPLATE_FIELD_WIDTH`]. Only then is it formatted once with empty values,
    which checks each spec against its field's type (`{score:.2f}` fine, `{prompt:d}` not) at a bounded cost.

    Args:
        template (`str`): the template.
        name (`str`): its argument name, for error messages.
        allowed (`tuple[str, ...]`): the placeholder names it may use.
        required (`str`, *optional*): a placeholder it must use.

    Raises:
        `ValueError`: naming the argument and the offending field.
    """
    if not isinstance(template, str):
        raise ValueError(f"`{name}` must be a str, got {type(template).__name__}.")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"`{name}` is {len(template)} characters long, above the limit of {MAX_TEMPLATE_CHARS}.")
    placeholders = ", ".join("{" + a + "}" for a in allowed)
    hint = f"allowed placeholders: {placeholders}; double literal braces as '{{{{' and '}}}}'"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"`{name}` {template!r} is not a valid template ({err}); {hint}.") from None
    for field_name, spec, conversion in fields:
        if field_name not in allowed:
            raise ValueError(f"`{name}` uses the placeholder {{{field_name}}}; {hint}.")
        if conversion is not None:
            raise ValueError(f"`{name}`: field {{{field_name}}} uses the conversion '!{conversion}'; none is allowed.")
        if "{" in spec or "}" in spec:
            raise ValueError(f"`{name}`: field {{{field_name}}} has a nested field in its format spec {spec!r}.")
        widest = max((int(n) for n in _SPEC_NUMBERS.findall(spec)), default=0)
        if widest > MAX_TEMPLATE_FIELD_WIDTH:
            raise ValueError(
                f"`{name}`: field {{{field_name}}} has the width or precision {widest} in its format spec {spec!r}, "
                f"above the limit of {MAX_TEMPLATE_FIELD_WIDTH}."
            )
    if required is not None and required not in {f for f, _, _ in fields}:
        raise ValueError(f"`{name}` must contain '{{{required}}}', got {template!r}.")
    empty = {field_name: 0.0 if field_name == "score" else "" for field_name in allowed}
    try:
        template.format(**empty)
    except (KeyError, IndexError, ValueError, TypeError) as err:
        raise ValueError(f"`{name}` {template!r} cannot be formatted ({err!r}); {hint}.") from None
    return template


def check_weight(value: Any, name: str) -> float:
    """Validates an interpolation weight λ: a finite number in [0, 1] (see [`check_float`])."""
    return check_float(value, name, minimum=0.0, maximum=1.0, hint="the interpolation weight λ")


def check_adaptive_weight(value: Any, name: str) -> float:
    """β of the per-token adaptive λ: a finite float ≥ 0."""
    return check_float(value, name, minimum=0.0)


def check_gate(value: Any, name: str) -> float | None:
    """Validates a decoding gate: `None` or a finite float threshold σ (see [`check_float`])."""
    return check_float(value, name, optional=True, hint="a gate threshold σ")


def check_early_exit(epsilon: Any, patience: Any) -> None:
    check_float(epsilon, "early_exit_epsilon", minimum=0.0, hint="0 disables it")
    check_int(patience, "early_exit_patience", minimum=1)
