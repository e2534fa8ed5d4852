"""Users sharded across worker processes. Per-user SPRInG training is embarrassingly parallel: a user's periods
touch only their own adapter and buffer. So each worker takes a disjoint set of users, chosen by a stable hash of
the user id, trains them as an ordinary single process (no process group, no DDP), and saves its own state; a merge
then combines the shards into one state, identical to a 1-process run (see
[`~ContinualPersonalizer.merge_shards`])."""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from ..persistence.continual_state import check_one_user_per_adapter, read_continual_state
from ..persistence.json_files import MAX_ADAPTER_CONFIG_BYTES, read_json_capped
from ..records import check_user_id, user_bucket
from ..utils.validation import check_int

if TYPE_CHECKING:
    import torch

    from .continual import ContinualPersonalizer

# What `accelerate launch` / torchrun set so that processes form one process group. A sharded worker removes them
# before transformers or accelerate read them, so that each worker trains alone.
DISTRIBUTED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)

logger = logging.get_logger(__name__)


def shard_of(user_id: str, num_shards: int) -> int:
    """The shard of a user: its [`~records.user_bucket`] among `num_shards`. Stable across processes, machines
    and Python versions (unlike `hash()`), and independent of which other users exist."""
    user_id = check_user_id(user_id)
    return user_bucket(user_id, check_int(num_shards, "num_shards", minimum=1))


@dataclass(frozen=True)
class UserShard:
    """One worker's share of the users.

    Args:
        index (`int`): this worker's shard, in `[0, count)`.
        count (`int`): the number of workers.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        for name in ("index", "count"):
            check_int(getattr(self, name), name)
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard needs 0 <= index < count, got index={self.index}, count={self.count}.")

    def owns(self, user_id: str) -> bool:
        """Whether this worker trains `user_id`."""
        return shard_of(user_id, self.count) == self.index


def claim_user_shard(environ: MutableMapping[str, str] | None = None) -> UserShard:
    """This process's shard under `accelerate launch --num_processes N` (or torchrun): `RANK` of `WORLD_SIZE`; shard
    0 of 1 outside a launcher. It also **removes the launcher's process-group variables** (`RANK`, `WORLD_SIZE`,
    `MASTER_ADDR`, ... see `DISTRIBUTED_ENV`) from the environment, so that transformers and accelerate then see a
    single process and each worker trains its own users without DDP, and pins each worker to its own GPU
    (`CUDA_VISIBLE_DEVICES` narrowed to the `LOCAL_RANK`-th device; an empty value, no GPU, is kept). Call it
    first, before building any `TrainingArguments` or `Accelerator` (a `RuntimeError` says so otherwise).

    Args:
        environ (`MutableMapping[str, str]`, *optional*): the environment to read and edit (default `os.environ`).

    Returns:
        [`UserShard`].
    """
    from ..utils.compat import accelerate_state_initialized

    env = os.environ if environ is None else environ
    if environ is None and accelerate_state_initialized():
        raise RuntimeError(
            "claim_user_shard() must run before any TrainingArguments or Accelerator is built: accelerate already "
            "set this process up as part of a process group."
        )
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK in the environment must be ints: {err}") from None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if local is not None and visible != "":
        # Without LOCAL_RANK every worker would pick cuda:0: give each worker its own GPU (when there are GPUs).
        devices = visible.split(",") if visible else [str(i) for i in range(local + 1)]
        if local < len(devices):
            env["CUDA_VISIBLE_DEVICES"] = devices[local]
    for name in DISTRIBUTED_ENV:
        env.pop(name, None)
    return UserShard(rank, world)


def merge_shards(
    personalizer_cls: type[ContinualPersonalizer],
    shard_directories: Sequence[str | os.PathLike],
    save_directory: str | os.PathLike,
    model: torch.nn.Module,
    *,
    memory_kwargs: dict | None = None,
    **kwargs: Any,
) -> ContinualPersonalizer:
    """Combines the states that sharded workers saved into one state in `save_directory`, and returns it: the body
    of [`~ContinualPersonalizer.merge_shards`], which calls it with its own class and documents the other arguments,
    the result and the errors (nothing is written when the shards do not fit together).

    Args:
        personalizer_cls (`type[ContinualPersonalizer]`): the class that loads the shards and builds the merge.
    """
    from ..memory import LoGoMemory
    from ..utils.modeling import base_name_or_path
    from .drift import BaseLogProbCache

    shards = [
        personalizer_cls.from_pretrained(model, directory, memory_kwargs=memory_kwargs)
        for directory in shard_directories
    ]
    if not shards:
        raise ValueError("`shard_directories` is empty.")
    first = shards[0]
    recorded = [shard.shard for shard in shards]
    if any(r is not None for r in recorded):
        counts = {r.count if r is not None else None for r in recorded}
        indices = sorted(r.index for r in recorded if r is not None)
        if len(counts) != 1 or None in counts or indices != list(range(next(iter(counts)))):
            found = [(r.index, r.count) if r is not None else None for r in recorded]
            raise ValueError(f"the shards' saved (index, count) are {found}: pass every worker's folder, each once.")
    _check_same_training(shards, shard_directories, base_name_or_path(model))
    owner: dict[str, int] = {}
    for i, shard in enumerate(shards):
        for user in shard.users:
            if user in owner:
                raise ValueError(f"user {user!r} is in shard {owner[user]} and shard {i}; shards must be disjoint.")
            owner[user] = i
    # Each shard's state file was checked alone: two shards may still hold users with one adapter name ('a.b', 'a_b').
    adapters = {user: shard.adapter_name(user) for shard in shards for user in shard.users}
    check_one_user_per_adapter(adapters, "merge_shards")
    memories = [s.memory for s in shards]
    if any(m is None for m in memories) and any(m is not None for m in memories):
        raise ValueError("some shards have a memory and some do not; their buffers cannot be merged.")
    memory = LoGoMemory.merge(memories) if memories[0] is not None else None
    cache = BaseLogProbCache(first.score_cache.model_name)
    for shard in shards:
        for key in shard.score_cache.keys():
            cache.put(key, shard.score_cache.get(key))
    kwargs.setdefault("max_resident_adapters", first.max_resident_adapters)
    merged = personalizer_cls(
        model, first.tokenizer, first.args, memory, spring_config=first.spring_config, score_cache=cache, **kwargs
    )
    for shard in shards:
        for user in shard.users:
            merged.add_user(user, shard.user_state(user), shard.adapter_pool.path_of(shard.adapter_name(user)))
    # learning_rate="auto": each shard chose on its own first users; the merged state keeps shard 0's choice (so it
    # does not search again) and says so when the shards disagree.
    choices = [(i, s.learning_rate_choice) for i, s in enumerate(shards) if s.learning_rate_choice is not None]
    if choices:
        rates = {i: c["learning_rate"] for i, c in choices}
        if len(set(rates.values())) > 1:
            logger.warning(f"merge_shards: the shards chose different learning rates for learning_rate='auto' "
                           f"({rates}); the merged state keeps shard {choices[0][0]}'s for its later updates.")  # fmt: skip
        merged.learning_rate_choice = choices[0][1]
    merged.save_pretrained(save_directory)
    return merged


# `adapter_config.json` fields that may differ between shards trained alike: the mode and the library version.
_LORA_CONFIG_IGNORED = ("inference_mode", "peft_version", "revision")


def _check_same_training(shards: list, directories: Sequence[str | os.PathLike], base: str | None) -> None:
    """Checks that every shard was trained like shard 0: the same base model (known: a shard without one is refused
    unless nothing, the `model` passed included, names one), adapter-name template, SPRInG settings (both the
    training arguments and the `spring_args` recorded in the state file) and LoRA config (`modules_to_save`, rank,
    targets, ...). Raises `ValueError` naming the field and the two shards."""
    first = shards[0]

    def mismatch(i: int, what: str, value: Any, expected: Any) -> ValueError:
        return ValueError(
            f"shard {i} ({directories[i]}) and shard 0 ({directories[0]}) differ in {what}: {value!r} and {expected!r}; "
            "only shards trained alike can be merged."
        )

    bases = [shard.saved_base_model for shard in shards]
    if (base is not None or any(bases)) and not all(bases):
        i = next(i for i, b in enumerate(bases) if not b)
        raise ValueError(
            f"shard {i} ({directories[i]}) does not record its base model, so it cannot be checked against "
            f"{base or next(b for b in bases if b)!r}; only shards saved from a named model can be merged."
        )
    for i, saved in enumerate(bases):
        if base is not None and saved != base:
            raise ValueError(f"shard {i} ({directories[i]}) was trained on {saved!r}, not on {base!r}.")
        if saved != bases[0]:
            raise mismatch(i, "the base model", saved, bases[0])
    recorded = [read_continual_state(directory).spring_args for directory in directories]
    lora = [_lora_config(shard, directories[i]) for i, shard in enumerate(shards)]
    for i, shard in enumerate(shards):
        if shard.adapter_name_template != first.adapter_name_template:
            raise mismatch(i, "`adapter_name_template`", shard.adapter_name_template, first.adapter_name_template)
        for what, ours, theirs in (
            ("the SPRInG setting", shard.args.spring_dict(), first.args.spring_dict()),
            ("the recorded `spring_args` field", recorded[i], recorded[0]),
            ("the LoRA config field", lora[i], lora[0]),
        ):
            if ours is None or theirs is None:  # a shard without users has no LoRA config to compare
                continue
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    raise mismatch(i, f"{what} {key!r}", ours.get(key), theirs.get(key))


def _lora_config(shard: Any, directory: str | os.PathLike) -> dict | None:
    """The LoRA config all adapters of `shard` share (from their `adapter_config.json`), None without users; raises
    `ValueError` when two of its own adapters differ."""
    config = None
    for user in shard.users:
        path = Path(shard.adapter_pool.path_of(shard.adapter_name(user))) / "adapter_config.json"
        data = read_json_capped(path, MAX_ADAPTER_CONFIG_BYTES, f"the adapter config of {user!r} in {directory}")
        if not isinstance(data, dict):
            raise ValueError(f"the adapter config of {user!r} in {directory} must hold a JSON object.")
        # peft writes `target_modules` from a set: its order is not part of the config.
        data = {k: sorted(v) if k == "target_modules" and isinstance(v, list) else v for k, v in data.items()}
        data = {k: v for k, v in data.items() if k not in _LORA_CONFIG_IGNORED}
        if config is not None and data != config:
            key = next(k for k in sorted(set(data) | set(config)) if data.get(k) != config.get(k))
            raise ValueError(f"{directory}: the adapters of one shard differ in the LoRA config field {key!r}.")
        config = data
    return config
