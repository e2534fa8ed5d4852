"""Users sharded across worker processes. Per-user SPRInG training is embarrassingly parallel: a user's periods
touch only their own adapter and buffer. So each worker takes a disjoint set of users, chosen by a stable hash of
the user id, trains them as an ordinary single process (no process group, no DDP), and saves its own state; a merge
then combines the shards into one state, identical to a 1-process run (see
[`~ContinualPersonalizer.merge_shards`])."""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    base = base_name_or_path(model)
    owner: dict[str, int] = {}
    for i, shard in enumerate(shards):
        if shard.args.spring_dict() != first.args.spring_dict():
            raise ValueError(f"shard {i} ({shard_directories[i]}) was trained with other SPRInG settings.")
        if shard.adapter_name_template != first.adapter_name_template:
            raise ValueError(
                f"shard {i} ({shard_directories[i]}) names adapters with `adapter_name_template` "
                f"{shard.adapter_name_template!r}, shard 0 with {first.adapter_name_template!r}."
            )
        saved = shard.saved_base_model
        if saved and base and saved != base:
            raise ValueError(f"shard {i} ({shard_directories[i]}) was trained on {saved!r}, not on {base!r}.")
        for user in shard.users:
            if user in owner:
                raise ValueError(f"user {user!r} is in shard {owner[user]} and shard {i}; shards must be disjoint.")
            owner[user] = i
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
    merged.save_pretrained(save_directory)
    return merged
