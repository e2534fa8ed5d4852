"""Users sharded across worker processes. Per-user SPRInG training is embarrassingly parallel: a user's periods
touch only their own adapter and buffer. So each worker takes a disjoint set of users, chosen by a stable hash of
the user id, trains them as an ordinary single process (no process group, no DDP), and saves its own state; a merge
then combines the shards into one state, identical to a 1-process run (see
[`~ContinualPersonalizer.merge_shards`])."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

from ..records import check_user_id, user_bucket

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
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"`num_shards` must be an int >= 1, got {num_shards!r}.")
    return user_bucket(user_id, num_shards)


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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {value!r}.")
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
