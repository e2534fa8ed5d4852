"""What `spring serve` serves and changes: the personalization state, the interaction journal, period updates and
erasure. Every method that touches the model or the memory runs on the engine thread (see `engine.py`).

The work directory holds the server's own copy of the state:

```
<workdir>/state/          # the last complete ContinualPersonalizer state (an atomic save_pretrained per update)
<workdir>/journal.jsonl   # every acknowledged interaction (persistence/journal.py)
<workdir>/serve.json      # the trained counts the state started with, and erasures in progress
```

A restart loads `<workdir>/state` when it exists (else `--state`), adds the journal's interactions that the saved
memory lacks, and queues for training every journaled interaction that no saved update trained: per user, the
journal's first `num_observed - initial_observed` interactions are trained (updates train a user's pending items in
journal order), the rest are pending.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..generation.config import SPRING_CONFIG_NAME, SpringConfig
from ..persistence.continual_state import STATE_FILE, read_continual_state
from ..persistence.journal import InteractionJournal, read_serve_state, write_serve_state
from ..records import Interaction, check_user_id

logger = logging.get_logger(__name__)

STATE_DIR = "state"


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas for the threads created from now on (no-op elsewhere). Each thread that allocates
    (the engine, the HTTP workers, fsync threads) otherwise gets an arena of its own, and freed tensor memory
    scattered over them is never given back: the server's RSS kept growing under load."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, int(arenas))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Collects garbage and asks glibc to return free heap pages to the system (no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_base(name: str, dtype: Any = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)


class ServerState:
    """The served personalization state (see the module docstring).

    Args:
        source (`str` or `os.PathLike`): a `ContinualPersonalizer` folder (served and updated) or a
            `SpringForCausalLM` folder (served; recorded interactions feed the history path, no period updates).
        workdir (`str` or `os.PathLike`): the server's work directory.
        period_size (`int`, *optional*, defaults to 8): a user's pending interactions that trigger their period
            update (0: never by count).
        base_model (`str`, *optional*): the base model, when not the one the folder names.
        max_resident_adapters (`int`, *optional*, defaults to 64): user adapters kept loaded.
        fsync (`bool`, *optional*, defaults to `True`): fsync every journal append.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        workdir: str | os.PathLike,
        *,
        period_size: int = 8,
        base_model: str | None = None,
        max_resident_adapters: int = 64,
        fsync: bool = True,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.period_size = int(period_size)
        self.journal = InteractionJournal(self.workdir, fsync=fsync)
        self.update_seconds: list[float] = []
        self.update_failures = 0
        self._unsaved = False  # an update trained but its save failed: the next change saves again
        saved = self.workdir / STATE_DIR
        ours = (saved / STATE_FILE).is_file() or (saved / SPRING_CONFIG_NAME).is_file()
        folder = Path(saved if ours else source)  # `--state` itself is never written to
        self.source = str(folder)
        self.personalizer = None
        if (folder / STATE_FILE).is_file():
            from ..training import ContinualPersonalizer
            from ..training.train_job import _quiet_in_place_notice

            state = read_continual_state(folder)
            model = _load_base(base_model or state.base_model_name_or_path)
            with _quiet_in_place_notice(True):  # the server loaded this model itself: nobody else holds it
                self.personalizer = ContinualPersonalizer.from_pretrained(
                    model, folder, max_resident_adapters=max_resident_adapters
                )
            self._rebuild_wrapper()
        elif (folder / SPRING_CONFIG_NAME).is_file() or not folder.exists():
            from ..generation import SpringForCausalLM

            kwargs = {"base_model_name_or_path": base_model} if base_model else {}
            self.spring = SpringForCausalLM.from_pretrained(str(folder), **kwargs)
            self.spring.eval()
        else:
            raise ValueError(
                f"`--state` {str(source)!r} is neither a ContinualPersonalizer folder ({STATE_FILE}) nor a "
                f"SpringForCausalLM folder ({SPRING_CONFIG_NAME})."
            )
        self.tokenizer = self.spring.tokenizer
        self.tokenizer.padding_side = "left"
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        eos = self.spring.base_model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = set(eos)
        self._serve = read_serve_state(self.workdir)
        if "initial_observed" not in self._serve:
            self._serve["initial_observed"] = {u: self._observed(u) for u in self._trained_users()}
            self._serve.setdefault("erasing", [])
            write_serve_state(self.workdir, self._serve)
        for user in list(self._serve.get("erasing", [])):  # an erasure that a crash interrupted is finished first
            self.forget_user(user)
        self.pending: dict[str, list[Interaction]] = defaultdict(list)
        self._replay()

    # ------------------------------------------------------------------------------------------------ loading
    def _rebuild_wrapper(self) -> None:
        """The serving wrapper over the personalizer's model and memory (again after an update: the first one wraps
        a plain model with peft)."""
        personalizer = self.personalizer
        config = personalizer.spring_config or SpringConfig(adapter_name_template=personalizer.adapter_name_template)
        if getattr(self, "spring", None) is not None and self.spring.base_model is personalizer.model:
            return
        users = personalizer.users[: max(personalizer.max_resident_adapters - 1, 0)]
        self.spring = personalizer.to_spring_model(config, users=users)
        self.spring.eval()

    def _trained_users(self) -> list[str]:
        return self.personalizer.users if self.personalizer is not None else []

    def _observed(self, user: str) -> int:
        if self.personalizer is None or user not in self.personalizer.users:
            return 0
        return self.personalizer.user_state(user).num_observed

    def _replay(self) -> None:
        memory = self.memory
        by_user: dict[str, list[Interaction]] = defaultdict(list)
        for _, item in self.journal.entries():
            by_user[item.user_id].append(item)
        added = 0
        for user, items in by_user.items():
            missing = [it for it in items if memory is None or memory.get(user, it.id) is None]
            if missing and memory is not None:
                memory.add_many(missing)
                added += len(missing)
            trained = self._observed(user) - int(self._serve["initial_observed"].get(user, 0))
            self.pending[user] = items[max(trained, 0) :] if self.personalizer is not None else []
        if by_user:
            waiting = sum(len(v) for v in self.pending.values())
            logger.info(f"journal replayed: {added} interactions added to the memory, {waiting} pending an update.")

    # ------------------------------------------------------------------------------------------------ serving
    @property
    def memory(self):
        return self.spring.memory

    def is_known(self, user: str | None) -> bool:
        """Whether `user` has an adapter or memory records (else they decode with the base model)."""
        if not user:
            return False
        if self.personalizer is not None and user in self.personalizer.users:
            return True
        if self.personalizer is None and self._adapter_of(user) is not None:
            return True
        memory = self.memory
        return memory is not None and memory.has_user(user)

    def _adapter_of(self, user: str) -> str | None:
        """The wrapper's adapter of `user` (a `SpringForCausalLM` folder's), or None."""
        from ..generation.adapters import adapter_name_for

        try:
            name = adapter_name_for(user, self.spring.spring_config.adapter_name_template)
        except ValueError:
            return None
        return name if name in (getattr(self.spring.base_model, "peft_config", None) or {}) else None

    def personalization_for(self, user: str | None):
        """How a row of `user` decodes: `user` (the state's configured pipeline) or None (the base model)."""
        return user if self.is_known(user) else None

    def before_batch(self, users: list[str | None]) -> None:
        """Loads the adapters of the batch's users (least recently used ones are offloaded)."""
        if self.personalizer is None:
            return
        for user in dict.fromkeys(u for u in users if u and u in self.personalizer.users):
            self.personalizer.load_user(user)
        self.spring.eval()

    # ------------------------------------------------------------------------------------------------ changes
    def record(self, items: list[Interaction]) -> list[str]:
        """Adds journaled `items` to the memory and to their users' pending updates; returns the users whose
        pending items reached `period_size`."""
        items = [it for it in items if self.journal.holds(it.user_id, it.id)]  # (its user may have been erased since)
        memory = self.memory
        if memory is not None and items:
            memory.add_many(items)
        due = []
        if self.personalizer is None:
            return due
        for item in items:
            self.pending[item.user_id].append(item)
        for user in dict.fromkeys(it.user_id for it in items):
            if self.period_size and len(self.pending[user]) >= self.period_size:
                due.append(user)
        return due

    def update(self, user: str) -> dict[str, Any] | None:
        """Runs `user`'s next SPRInG period on their pending interactions and saves the state atomically. On an
        error the previous adapter keeps serving (`ContinualPersonalizer.observe` leaves it unchanged) and the items
        stay pending."""
        items = list(self.pending.get(user) or [])
        if self.personalizer is None or not items:
            return None
        started = time.perf_counter()
        try:
            output = self.personalizer.observe(user, items)
        except Exception as err:
            self.update_failures += 1
            logger.error(f"the period update of {user!r} failed; the previous adapter keeps serving: {err!r}")
            return None
        finally:
            self._rebuild_wrapper()
            self.spring.eval()
        self.pending[user] = self.pending[user][len(items) :]  # trained: never trained twice, saved or not
        self.save()
        release_memory()  # training's buffers: given back, so a long-running server stays flat
        seconds = time.perf_counter() - started
        self.update_seconds.append(seconds)
        logger.info(f"user {user!r}: period {output.period} trained on {len(items)} new items in {seconds:.1f} s.")
        return {"user": user, "period": output.period, "items": len(items), "seconds": seconds}

    def forget_user(self, user: str) -> bool:
        """Erases `user`: memory, adapter, community contributions, journal lines and pending items. Marked in
        `serve.json` first, so a crash midway is finished at the next start."""
        user = check_user_id(user)
        erasing = self._serve.setdefault("erasing", [])
        if user not in erasing:
            erasing.append(user)
            write_serve_state(self.workdir, self._serve)
        known = False
        if self.personalizer is not None:
            known = bool(self.personalizer.forget_user(user))
            self._rebuild_wrapper()
        else:
            known = bool(self.spring.forget_user(user))
        self._unsaved = True
        if not self.save():  # the erasure must reach the saved state before it is done
            raise RuntimeError(f"the erasure of {user!r} could not be saved; it is finished at the next start.")
        known = bool(self.journal.forget_user(user)) or known
        getattr(self, "pending", {}).pop(user, None)
        self._serve["initial_observed"].pop(user, None)
        erasing.remove(user)
        write_serve_state(self.workdir, self._serve)
        return known

    def save(self) -> bool:
        """Saves the state atomically to `<workdir>/state` (a `ContinualPersonalizer` folder, or the wrapper's
        `SpringForCausalLM` folder); returns whether it did. A failed save is logged and retried at the next change.
        """
        try:
            if self.personalizer is not None:
                self.personalizer.save_pretrained(self.workdir / STATE_DIR)
            else:
                self.spring.save_pretrained(self.workdir / STATE_DIR)
        except Exception as err:
            self._unsaved = True
            self.update_failures += 1
            logger.error(
                f"saving the state to {self.workdir / STATE_DIR} failed (retried at the next change): {err!r}"
            )
            return False
        self._unsaved = False
        return True

    def user_summary(self, user: str) -> dict[str, Any]:
        """Counts, never content."""
        memory = self.memory
        summary = {
            "user": user,
            "known": self.is_known(user),
            "memory_items": len(memory.history(user)) if memory is not None and memory.has_user(user) else 0,
            "buffer_items": len(memory.buffer(user)) if memory is not None and memory.has_user(user) else 0,
            "pending_items": len(self.pending.get(user, [])),
            "journal_items": len(self.journal.entries(user)),
            "has_adapter": self.personalizer is not None and user in self.personalizer.users,
            "periods": self.personalizer.period(user) if self.personalizer is not None else 0,
        }
        return summary
