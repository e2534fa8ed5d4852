"""`spring memory DIR`: what a state or memory folder holds, as counts (text only for one user, when asked)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..records import check_user_id

# How much of one prompt or response `describe_state(..., show_text=True)` shows.
TEXT_PREVIEW_CHARS = 200


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds")


def describe_state(
    directory: str | os.PathLike,
    *,
    user: str | None = None,
    show_text: bool = False,
    memory_kwargs: dict | None = None,
) -> dict[str, Any]:
    """
    Summarizes a folder saved by [`ContinualPersonalizer.save_pretrained`] (`spring train`'s output) or by
    [`LoGoMemory.save_pretrained`]: per user, the history and buffer counts, the first and last interaction times,
    whether they share with the global memory and, for a state, their adapter, periods trained and interactions
    observed. No text is returned unless `show_text` is set for one `user`.

    Args:
        directory (`str` or `os.PathLike`): the folder.
        user (`str`, *optional*): only this user.
        show_text (`bool`, *optional*, defaults to `False`): with `user`, also that user's records (prompts and
            responses cut to `TEXT_PREVIEW_CHARS` characters).
        memory_kwargs (`dict`, *optional*): passed to the memory's load (`encoder=` for a custom encoder).

    Returns:
        `dict`: `kind` (`"state"` or `"memory"`), `users` (a list of per-user dicts), `num_users`, `num_records` and,
        with `show_text`, `records`.

    Raises:
        `FileNotFoundError`: not such a folder. `KeyError`: an unknown `user`. `ValueError`: `show_text` without
        `user`, or a damaged folder (the file and field are named).
    """
    from ..generation.model import MEMORY_DIR
    from ..memory import LoGoMemory
    from ..persistence.continual_state import STATE_FILE, read_continual_state
    from ..persistence.folder import reading
    from ..persistence.memory_files import CONFIG_FILE

    if show_text and user is None:
        raise ValueError("`show_text` needs `user`: text is shown for one user at a time.")
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no local folder {str(path)!r}.")
    with reading(path):
        state = read_continual_state(path) if (path / STATE_FILE).is_file() else None
    memory_dir = path / MEMORY_DIR if state is not None else path
    memory = None
    if (memory_dir / CONFIG_FILE).is_file():
        memory = LoGoMemory.from_pretrained(memory_dir, **(memory_kwargs or {}))
    elif state is None:
        raise FileNotFoundError(f"{path} holds neither a `spring train` / ContinualPersonalizer state "
                                f"({STATE_FILE}) nor a LoGoMemory ({CONFIG_FILE}).")  # fmt: skip
    users = list(state.users) if state is not None else []
    for known in memory.users() if memory is not None else []:
        if known not in users:
            users.append(known)
    if user is not None:
        user = check_user_id(user)
        if user not in users:
            import difflib

            close = difflib.get_close_matches(user, users, n=3)
            raise KeyError(f"unknown user {user!r} in {path} ({len(users)} users; closest: {close}).")
        users = [user]
    rows = []
    for name in users:
        history = memory.history(name) if memory is not None else []
        row = {
            "user_id": name,
            "history": len(history),
            "buffer": len(memory.buffer(name)) if memory is not None else 0,
            "first": _iso(history[0].timestamp) if history else None,
            "last": _iso(history[-1].timestamp) if history else None,
            "shared": memory.is_shared(name) if memory is not None else None,
        }
        if state is not None:
            entry = state.users.get(name)
            row.update(
                adapter=entry.adapter if entry else None,
                periods=entry.next_period if entry else 0,
                observed=entry.num_observed if entry else 0,
            )
        rows.append(row)
    summary = {
        "kind": "state" if state is not None else "memory",
        "users": rows,
        "num_users": len(rows),
        "num_records": sum(row["history"] for row in rows),
    }
    if show_text:
        cut = lambda text: text if len(text) <= TEXT_PREVIEW_CHARS else text[:TEXT_PREVIEW_CHARS] + "…"  # noqa: E731
        summary["records"] = [
            {"region": region, "time": _iso(record.timestamp), "prompt": cut(record.prompt),
             "response": cut(record.response)}
            for region, records in (("history", memory.history(user)), ("buffer", memory.buffer(user)))
            for record in records
        ] if memory is not None else []  # fmt: skip
    return summary
