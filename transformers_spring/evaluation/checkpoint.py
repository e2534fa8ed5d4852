"""The benchmark's checkpoint: a JSON file written (atomically) after the selection and after every user, which a
rerun with the same settings, model and split continues."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..persistence.atomic import atomic_write_text
from .benchmark_config import BenchmarkArguments

logger = logging.get_logger(__name__)

# Settings that do not change results: where output goes, thread counts, whether to resume.
_NOT_COMPARED = ("out", "threads", "resume")


def fingerprint(args: BenchmarkArguments) -> dict[str, Any]:
    """The settings a checkpoint must match to be continued."""
    config = dataclasses.asdict(args)
    for key in _NOT_COMPARED:
        config.pop(key, None)
    return config


def split_identity(splits: dict[str, list], model: Any, model_name: str) -> dict[str, str]:
    """What else a checkpoint must match: the model and the exact split (users, item ids, times and texts), so that
    an edited data file or another model object is not continued.

    Args:
        splits (`dict[str, list[PeriodSplit]]`): the run's users and periods.
        model: the model (its `config.name_or_path` names it).
        model_name (`str`): the name used when the model's config has none.
    """
    digest = hashlib.sha256()
    for user, periods in splits.items():
        for period in periods:
            for part, items in (("train", period.train), ("test", period.test)):
                for it in items:
                    fields = (user, str(period.period), part, it.id, repr(it.timestamp), it.prompt, it.response)
                    digest.update("\x1f".join(fields).encode("utf-8", "surrogatepass") + b"\x1e")
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or model_name
    return {"split_sha256": digest.hexdigest(), "model": name}


def settings_match(saved: Any, args: BenchmarkArguments) -> bool:
    """Whether a checkpoint's settings are this run's. A setting the checkpoint lacks (added by a later version of
    the package) matches when it is at its default."""
    if not isinstance(saved, dict):
        return False
    defaults = dataclasses.asdict(BenchmarkArguments(preset=args.preset))  # preset-resolved defaults
    current = fingerprint(args)
    return all(
        saved[key] == value if key in saved else value == defaults.get(key, object()) for key, value in current.items()
    ) and set(saved) <= set(current)


def load_checkpoint(
    path: Path | None, args: BenchmarkArguments, identity: dict[str, str], users: int | None = None
) -> dict[str, Any] | None:
    """The checkpoint at `path` when it exists and matches `args` and `identity`; None (with a warning saying
    why) to start over.

    A run it continues is announced at warning level (the `spring` commands show warnings only): how many of the
    run's `users` are already done, and how to start over instead. Resuming is the default, so a rerun that
    silently skipped finished users would look like a bug.
    """
    if path is None or not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning(f"ignoring the unreadable benchmark checkpoint {path} ({err}); starting over.")
        return None
    if not isinstance(state, dict) or not settings_match(state.get("fingerprint"), args):
        logger.warning(f"the benchmark checkpoint {path} was made with other settings; starting over.")
        return None
    if "identity" not in state:  # written before checkpoints recorded it: the settings matched, so continue
        logger.warning(f"the benchmark checkpoint {path} records no model/data identity; continuing it.")
        state["identity"] = identity
    elif state["identity"] != identity:
        logger.warning(f"the benchmark checkpoint {path} was made with another model or data; starting over.")
        return None
    done = len(state.get("done", []))
    of = f" of {users}" if users is not None else ""
    logger.warning(
        f"Resuming from {path}: {done}{of} users already done (delete it or pass a new --out to start over)."
    )
    return state


def save_checkpoint(path: Path | None, state: dict[str, Any]) -> None:
    """Writes `state` to `path` atomically (nothing when `path` is None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, ensure_ascii=False))
