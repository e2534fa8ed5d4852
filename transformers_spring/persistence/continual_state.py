"""The state files of a [`ContinualPersonalizer`] folder, read (and validated) and written here only:

```
<dir>/continual_state.json   # format version, base model, naming template, users -> {adapter, next_period, num_observed},
                             # and how `learning_rate="auto"` was resolved (`learning_rate_choice`)
<dir>/training_args.json     # the training arguments that differ from their defaults (no secrets)
<dir>/base_logprobs.json     # the base log-prob cache (written by `BaseLogProbCache.save`)
```

A `continual_state.json` without `adapter_name_template` (saved before the key existed) means `"{user_id}"`; one
without `learning_rate_choice` means that no choice was made yet. A `training_args.json` without `spring_preset`
(saved before presets existed) was written under the paper's defaults: it is read with `spring_preset="paper"`.

A saved folder may come from someone else, so reading one never lets it act: each file is size-capped before it is
parsed (see [`~persistence.json_files`]), two users never share an adapter, and `training_args.json` only restores
the training hyperparameters in [`RESUMABLE_TRAINING_FIELDS`] (plus the SPRInG fields): pushing, reporting,
checkpoint and config paths always come from the caller."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..generation.adapters import DEFAULT_ADAPTER_NAME_TEMPLATE, adapter_name_for, check_adapter_name_template
from ..records import check_user_id
from ..version import __version__
from .json_files import MAX_STATE_BYTES, MAX_TRAINING_ARGS_BYTES, read_json_capped

logger = logging.get_logger(__name__)

STATE_FILE = "continual_state.json"
ARGS_FILE = "training_args.json"
CACHE_FILE = "base_logprobs.json"
FORMAT_VERSION = 1
# Never written to `training_args.json`: a pushed state would leak them.
SECRET_FIELDS = ("hub_token", "push_to_hub_token")
# Always written to `training_args.json` (when the arguments have it), even at its default: a file without
# `spring_preset` is one saved before presets existed, whose unset fields had the paper's defaults (`LEGACY_PRESET`).
PRESET_FIELD = "spring_preset"
LEGACY_PRESET = "paper"
# How `ContinualPersonalizer` resolved `learning_rate="auto"` (`learning_rate_choice` in `continual_state.json`).
LEARNING_RATE_RULES = ("validation", "size default")
# A grid of a handful of learning rates; a longer list in a file is refused rather than carried along.
MAX_LEARNING_RATE_GRID = 64
# The `TrainingArguments` fields a saved `training_args.json` may restore: hyperparameters that change how a period
# trains, never where anything is written, pushed, reported or loaded from. Every other field (`push_to_hub`,
# `hub_*`, `report_to`, `output_dir`, `logging_dir`, `resume_from_checkpoint`, `deepspeed`, `fsdp_config`,
# `save_strategy`, `torch_compile`, `dataloader_num_workers`, ...) takes its default or the caller's value. The
# SPRInG fields (those the arguments class adds to `TrainingArguments`) are restored too; they are validated by it.
RESUMABLE_TRAINING_FIELDS = frozenset(
    {
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "average_tokens_across_devices",
        "optim",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "label_smoothing_factor",
        "neftune_noise_alpha",
        "bf16",
        "fp16",
        "tf32",
        "activation_checkpointing",
        "use_cpu",
        "seed",
        "data_seed",
        "full_determinism",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "disable_tqdm",
        "eval_strategy",
        "eval_steps",
        "remove_unused_columns",
        "dataloader_drop_last",
        "ddp_find_unused_parameters",
    }
)


@dataclass(frozen=True)
class UserState:
    """One user's entry in `continual_state.json`.

    Args:
        adapter (`str`): the user's adapter name (`adapter_name_for(user_id, template)`).
        next_period (`int`): the period index the user's next `observe` runs.
        num_observed (`int`, *optional*, defaults to 0): how many interactions the user's periods trained on.
    """

    adapter: str
    next_period: int
    num_observed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ContinualState:
    """The content of `continual_state.json`.

    Args:
        users (`dict[str, UserState]`): the users, in first-observed order.
        adapter_name_template (`str`, *optional*, defaults to `"{user_id}"`): how a user id becomes an adapter name.
        base_model_name_or_path (`str`, *optional*): the base model the adapters were trained on.
        max_resident_adapters (`int`, *optional*): the saved personalizer's bound on loaded adapters.
        spring_args (`dict`, *optional*): the SPRInG settings (`SpringTrainingArguments.spring_dict()`).
        shard (`tuple[int, int]`, *optional*): a sharded worker's `(index, count)`.
        learning_rate_choice (`dict`, *optional*): how `learning_rate="auto"` was resolved: `learning_rate` (a
            float), `rule` (`"validation"` or `"size default"`), `grid` (per learning rate tried, its
            `validation_nll`; empty without a search) and counts (`fit_items`, `validation_items`,
            `num_parameters`). None: not resolved yet (or a float learning rate).
    """

    users: dict[str, UserState] = field(default_factory=dict)
    adapter_name_template: str = DEFAULT_ADAPTER_NAME_TEMPLATE
    base_model_name_or_path: str | None = None
    max_resident_adapters: int | None = None
    spring_args: dict[str, Any] = field(default_factory=dict)
    shard: tuple[int, int] | None = None
    learning_rate_choice: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library": "transformers_spring",
            "library_version": __version__,
            "base_model_name_or_path": self.base_model_name_or_path,
            "max_resident_adapters": self.max_resident_adapters,
            "adapter_name_template": self.adapter_name_template,
            "spring_args": self.spring_args,
            "users": {user: entry.to_dict() for user, entry in self.users.items()},
            **({"shard": list(self.shard)} if self.shard is not None else {}),
            **({"learning_rate_choice": self.learning_rate_choice} if self.learning_rate_choice is not None else {}),
        }


def write_continual_state(directory: str | os.PathLike, state: ContinualState) -> None:
    """Writes `continual_state.json` (users stay in first-observed order: no `sort_keys`)."""
    (Path(directory) / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2), encoding="utf-8")


def read_continual_state(directory: str | os.PathLike) -> ContinualState:
    """Reads and validates `continual_state.json`: the format version, the naming template, real user ids each with
    the adapter name the template derives from it (a name from a file becomes a path, so `"../../x"` is refused),
    non-negative int counters and the shard's shape.

    Raises:
        `ValueError`: naming the file and the field.
    """
    path = Path(directory) / STATE_FILE
    data = read_json_capped(path, MAX_STATE_BYTES)
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else None
        raise ValueError(f"{path} has format_version {found!r}; this version reads {FORMAT_VERSION}.")
    users = data.get("users")
    if not isinstance(users, dict):
        raise ValueError(f"{path} is missing the field 'users'.")
    template = data.get("adapter_name_template", DEFAULT_ADAPTER_NAME_TEMPLATE)
    try:
        template = check_adapter_name_template(template)
    except ValueError as err:
        raise ValueError(f"{path}: field 'adapter_name_template': {err}") from None
    shard = data.get("shard")
    if shard is not None:
        if not (isinstance(shard, list) and len(shard) == 2):
            raise ValueError(f"{path}: field 'shard' must be [index, count], got {shard!r}.")
        shard = tuple(shard)
    spring_args = data.get("spring_args", {})
    base_model = data.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise ValueError(f"{path}: field 'base_model_name_or_path' must be a string or null, got {base_model!r}.")
    max_resident = data.get("max_resident_adapters")
    if max_resident is not None and (isinstance(max_resident, bool) or not isinstance(max_resident, int)):
        raise ValueError(f"{path}: field 'max_resident_adapters' must be an int or null, got {max_resident!r}.")
    return ContinualState(
        users=_checked_users(users, template, path),
        adapter_name_template=template,
        base_model_name_or_path=base_model,
        max_resident_adapters=max_resident,
        spring_args=spring_args if isinstance(spring_args, dict) else {},
        shard=shard,
        learning_rate_choice=check_learning_rate_choice(data.get("learning_rate_choice"), str(path)),
    )


def check_learning_rate_choice(choice: Any, where: str = "") -> dict[str, Any] | None:
    """Validates a `learning_rate_choice` (see [`ContinualState`]) and returns it with plain values: a positive
    finite `learning_rate`, a known `rule`, a `grid` of `{learning_rate, validation_nll}` entries (a non-finite NLL is
    stored as None) and non-negative int counts. None passes.

    Args:
        choice (`Any`): the value.
        where (`str`, *optional*): what holds it, for the messages (e.g. the file).

    Raises:
        `ValueError`: naming the field (`learning_rate_choice.rule`, ...).
    """
    if choice is None:
        return None
    prefix = f"{where}: field " if where else ""

    def wrong(part: str, requirement: str, value: Any) -> ValueError:
        return ValueError(f"{prefix}'learning_rate_choice{part}' must be {requirement}, got {value!r}.")

    def rate(value: Any, part: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise wrong(part, "a positive finite number", value)
        return float(value)

    if not isinstance(choice, dict):
        raise wrong("", "an object or null", type(choice).__name__)
    if choice.get("rule") not in LEARNING_RATE_RULES:
        raise wrong(".rule", f"one of {LEARNING_RATE_RULES}", choice.get("rule"))
    checked: dict[str, Any] = {"learning_rate": rate(choice.get("learning_rate"), ".learning_rate")}
    checked["rule"] = choice["rule"]
    grid = choice.get("grid", [])
    if not isinstance(grid, list) or len(grid) > MAX_LEARNING_RATE_GRID:
        raise wrong(".grid", f"a list of at most {MAX_LEARNING_RATE_GRID} entries", type(grid).__name__)
    checked["grid"] = []
    for i, entry in enumerate(grid):
        if not isinstance(entry, dict):
            raise wrong(f".grid[{i}]", "an object", type(entry).__name__)
        nll = entry.get("validation_nll")
        if nll is not None and (isinstance(nll, bool) or not isinstance(nll, (int, float))):
            raise wrong(f".grid[{i}].validation_nll", "a number or null", nll)
        learning_rate = rate(entry.get("learning_rate"), f".grid[{i}].learning_rate")
        finite = nll is not None and math.isfinite(nll)
        checked["grid"].append({"learning_rate": learning_rate, "validation_nll": float(nll) if finite else None})
    for key in ("fit_items", "validation_items", "num_parameters"):
        if key in choice:
            value = choice[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise wrong(f".{key}", "a non-negative int", value)
            checked[key] = value
    return checked


def _checked_users(users: dict, template: str, path: Path) -> dict[str, UserState]:
    checked = {}
    for user_id, entry in users.items():
        try:
            user_id = check_user_id(user_id)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: field 'users' holds an invalid user id: {err}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: field 'users.{user_id}' must be an object, got {type(entry).__name__}.")
        expected = adapter_name_for(user_id, template)
        if entry.get("adapter") != expected:
            raise ValueError(
                f"{path}: field 'users.{user_id}.adapter' is {entry.get('adapter')!r}, but the adapter of user "
                f"{user_id!r} under the template {template!r} is {expected!r}."
            )
        counters = {}
        for key in ("next_period", "num_observed"):
            value = entry.get(key, 0 if key == "num_observed" else None)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
                raise ValueError(f"{path}: field 'users.{user_id}.{key}' must be a non-negative int, got {value!r}.")
            counters[key] = value
        checked[user_id] = UserState(expected, **counters)
    check_one_user_per_adapter({user: entry.adapter for user, entry in checked.items()}, str(path))
    return checked


def check_one_user_per_adapter(adapters: Mapping[str, str], where: str) -> None:
    """Checks that no two users share an adapter name. `adapter_name_for` replaces the characters of a user id
    outside `[A-Za-z0-9_-]` by `_`, so `"a.b"` and `"a_b"` both map to `"a_b"`: accepted together, one user would
    train, and decode with, the other's weights.

    Args:
        adapters (`Mapping[str, str]`): user id → adapter name.
        where (`str`): what holds them (a file, "the merged shards", ...), for the error message.

    Raises:
        `ValueError`: naming both users and the adapter.
    """
    owner: dict[str, str] = {}
    for user, name in adapters.items():
        if name in owner and owner[name] != user:
            raise ValueError(
                f"{where}: users {owner[name]!r} and {user!r} map to the same adapter name {name!r}; one user would "
                "use the other's weights. Use user ids that differ in [A-Za-z0-9_-] characters."
            )
        owner[name] = user


def check_new_user_adapter(adapters: Mapping[str, str], user_id: str, name: str) -> None:
    """Checks that `user_id`'s adapter name `name` is not already another user's (see
    [`check_one_user_per_adapter`]); `adapters` maps the known users to their adapter names."""
    check_one_user_per_adapter({**{u: a for u, a in adapters.items() if u != user_id}, user_id: name}, "observe")


def write_training_args(directory: str | os.PathLike, args: Any) -> None:
    """Writes `training_args.json`: the fields of the dataclass `args` that [`read_training_args`] restores and that
    differ from their declared defaults (`output_dir` always, as a record, and `spring_preset` always, see
    [`PRESET_FIELD`]; secrets never). The defaults are read from the dataclass fields: building a second
    `TrainingArguments` would re-initialise accelerate's process state, which breaks a distributed run."""
    current = args.to_dict()
    restored = _restored_fields(type(args))
    diff = {}
    for f in dataclasses.fields(args):
        if not f.init or f.name in SECRET_FIELDS or f.name not in current:
            continue
        if f.name not in restored and f.name != "output_dir":  # never read back: a save records what a load restores
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        default = getattr(default, "value", default)  # enums are saved as their values
        if current[f.name] != default or f.name in ("output_dir", PRESET_FIELD):
            diff[f.name] = current[f.name]
    (Path(directory) / ARGS_FILE).write_text(json.dumps(diff, indent=2, sort_keys=True), encoding="utf-8")


def _restored_fields(args_class: type) -> set[str]:
    """The fields of `args_class` a `training_args.json` may set: [`RESUMABLE_TRAINING_FIELDS`] and the fields it
    adds to `TrainingArguments` (the SPRInG settings)."""
    from transformers import TrainingArguments

    base_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    own_fields = {f.name for f in dataclasses.fields(args_class) if f.init} - base_fields
    return (RESUMABLE_TRAINING_FIELDS & base_fields) | own_fields


def read_training_args(
    directory: str | os.PathLike, args_class: type, work_dir: str | os.PathLike | None = None
) -> Any:
    """The `args_class` instance `training_args.json` describes, restoring only the training hyperparameters
    ([`RESUMABLE_TRAINING_FIELDS`] and the fields `args_class` adds to `TrainingArguments`). A saved folder may come
    from someone else: a field that would push (`push_to_hub`, `hub_model_id`, ...), report (`report_to`), write
    elsewhere (`output_dir`, `logging_dir`) or load a file (`resume_from_checkpoint`, `deepspeed`, ...) is ignored,
    with a warning naming it, and keeps its default (`push_to_hub=False`, `report_to="none"`, ...). A file without
    `spring_preset` (saved before presets existed) is read with `spring_preset="paper"`, the defaults it was saved
    under.

    Args:
        directory (`str` or `os.PathLike`): the saved folder.
        args_class (`type`): the arguments dataclass (a `TrainingArguments` subclass).
        work_dir (`str` or `os.PathLike`, *optional*): the personalizer's own work folder (its `offload_dir`);
            `output_dir` becomes `<work_dir>/trainer_output`, or a fresh temporary folder, removed with the
            arguments, when it is None.

    Raises:
        `ValueError`: the file is too large (see [`~persistence.json_files.MAX_TRAINING_ARGS_BYTES`]), not a JSON
        object, or holds an invalid value.
    """
    path = Path(directory) / ARGS_FILE
    data = read_json_capped(path, MAX_TRAINING_ARGS_BYTES)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    allowed = _restored_fields(args_class)
    ignored = sorted(set(data) - allowed - {"output_dir"})  # output_dir is always written, always replaced
    if ignored:
        logger.warning(
            f"{path}: ignoring saved field(s) {ignored}: a loaded state restores only training hyperparameters; "
            "pass your own `args` for pushing, reporting, checkpointing or paths."
        )
    if work_dir is not None:
        output_dir = Path(work_dir) / "trainer_output"
        cleanup = None
    else:
        output_dir = Path(tempfile.mkdtemp(prefix="spring-trainer-")) / "trainer_output"
        cleanup = output_dir.parent
    restored = {k: v for k, v in data.items() if k in allowed}
    if PRESET_FIELD in allowed and PRESET_FIELD not in data:
        # Saved before presets existed: the fields it leaves out had the defaults of then, the paper's.
        restored[PRESET_FIELD] = LEGACY_PRESET
        logger.info(f"{path} has no `{PRESET_FIELD}` (saved by an earlier release): read with its defaults of then, "
                    f"{PRESET_FIELD}={LEGACY_PRESET!r}.")  # fmt: skip
    args = args_class(output_dir=str(output_dir), **restored)
    if cleanup is not None:
        weakref.finalize(args, shutil.rmtree, str(cleanup), True)
    return args


# ------------------------------------------------------------------------------------------------ `spring train`
TRAIN_JOB_FILE = "train_job.json"
# `train_job.json`: a data digest, a dozen options and SPRInG's settings, a few KiB.
MAX_TRAIN_JOB_BYTES = 1 << 20


def write_train_job(directory: str | os.PathLike, job: dict) -> None:
    """Writes `train_job.json` (what a `spring train` run in this folder reads and how: see
    [`~training.train_job_config.fingerprint`]) atomically, beside the state that save_pretrained manages.

    Args:
        directory (`str` or `os.PathLike`): the state folder.
        job (`dict`): the run's fingerprint.
    """
    from .folder import atomic_write_text

    atomic_write_text(Path(directory) / TRAIN_JOB_FILE, json.dumps({"format_version": 1, **job}, indent=2))


def read_train_job(directory: str | os.PathLike) -> dict | None:
    """The run described by `train_job.json` in `directory`, or None when there is none.

    Args:
        directory (`str` or `os.PathLike`): the state folder.

    Raises:
        `ValueError`: naming the file, when it is not a JSON object of this format.
    """
    path = Path(directory) / TRAIN_JOB_FILE
    if not path.exists():
        return None
    data = read_json_capped(path, MAX_TRAIN_JOB_BYTES)
    if not isinstance(data, dict) or data.pop("format_version", None) != 1:
        raise ValueError(f"{path} is not a `spring train` job file of format_version 1.")
    return data
