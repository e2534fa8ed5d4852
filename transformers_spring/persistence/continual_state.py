"""The state files of a [`ContinualPersonalizer`] folder, read (and validated) and written here only:

```
<dir>/continual_state.json   # format version, base model, naming template, users -> {adapter, next_period, num_observed}
<dir>/training_args.json     # the training arguments that differ from their defaults (no secrets)
<dir>/base_logprobs.json     # the base log-prob cache (written by `BaseLogProbCache.save`)
```

A `continual_state.json` without `adapter_name_template` (saved before the key existed) means `"{user_id}"`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..generation.adapters import DEFAULT_ADAPTER_NAME_TEMPLATE, adapter_name_for, check_adapter_name_template
from ..records import check_user_id
from ..version import __version__

logger = logging.get_logger(__name__)

STATE_FILE = "continual_state.json"
ARGS_FILE = "training_args.json"
CACHE_FILE = "base_logprobs.json"
FORMAT_VERSION = 1
# Never written to `training_args.json`: a pushed state would leak them.
SECRET_FIELDS = ("hub_token", "push_to_hub_token")


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
    """

    users: dict[str, UserState] = field(default_factory=dict)
    adapter_name_template: str = DEFAULT_ADAPTER_NAME_TEMPLATE
    base_model_name_or_path: str | None = None
    max_resident_adapters: int | None = None
    spring_args: dict[str, Any] = field(default_factory=dict)
    shard: tuple[int, int] | None = None

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
    data = json.loads(path.read_text(encoding="utf-8"))
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
    return ContinualState(
        users=_checked_users(users, template, path),
        adapter_name_template=template,
        base_model_name_or_path=data.get("base_model_name_or_path"),
        max_resident_adapters=data.get("max_resident_adapters"),
        spring_args=spring_args if isinstance(spring_args, dict) else {},
        shard=shard,
    )


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
    return checked


def write_training_args(directory: str | os.PathLike, args: Any) -> None:
    """Writes `training_args.json`: the fields of the dataclass `args` that differ from their declared defaults
    (`output_dir` always; secrets never). The defaults are read from the dataclass fields: building a second
    `TrainingArguments` would re-initialise accelerate's process state, which breaks a distributed run."""
    current = args.to_dict()
    diff = {}
    for f in dataclasses.fields(args):
        if not f.init or f.name in SECRET_FIELDS or f.name not in current:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        default = getattr(default, "value", default)  # enums are saved as their values
        if current[f.name] != default or f.name == "output_dir":
            diff[f.name] = current[f.name]
    (Path(directory) / ARGS_FILE).write_text(json.dumps(diff, indent=2, sort_keys=True), encoding="utf-8")


def read_training_args(directory: str | os.PathLike, args_class: type) -> Any:
    """The `args_class` instance `training_args.json` describes (unknown fields, from a newer release, are ignored
    with a warning)."""
    data = json.loads((Path(directory) / ARGS_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{Path(directory) / ARGS_FILE} must hold a JSON object.")
    init_fields = {f.name for f in dataclasses.fields(args_class) if f.init}
    unknown = sorted(set(data) - init_fields)
    if unknown:
        logger.warning(f"{ARGS_FILE}: ignoring unknown field(s) {unknown}.")
    return args_class(**{k: v for k, v in data.items() if k in init_fields})
