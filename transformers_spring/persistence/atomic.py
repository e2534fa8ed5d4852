"""Atomic files (a temporary sibling and `os.replace`), the whole-directory swap for folders the library owns outright
(the converted-model cache), and where a load finds a saved folder. Saves into user folders go through
[`~persistence.folder.save_folder`]."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging

from .folder import atomic_write_bytes, atomic_write_text  # noqa: F401 (one home; re-exported)

logger = logging.get_logger(__name__)

OLD_SUFFIX = ".spring-old-"


@contextmanager
def atomic_directory(save_directory: str | os.PathLike) -> Iterator[Path]:
    """
    Yields the path of a fresh temporary sibling of `save_directory` for the caller to create and fill (it does not
    exist yet); on a clean exit it replaces
    `save_directory`, on an error it is deleted and `save_directory` is untouched. Between the two renames of the
    swap the previous version survives as a hidden `.<name>.spring-old-*` sibling, which [`resolve_saved_directory`]
    finds.

    Args:
        save_directory (`str` or `os.PathLike`): the directory to (re)place.

    Yields:
        `Path`: the temporary directory to write.
    """
    target = Path(save_directory).absolute()
    if target.is_file():
        raise ValueError(f"`save_directory` ({target}) must be a directory, not a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        if target.exists():
            backup = target.parent / f".{target.name}{OLD_SUFFIX}{uuid.uuid4().hex[:12]}"
            os.rename(target, backup)
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_saved_directory(path: str | os.PathLike) -> Path | None:
    """`path` if it is a directory, first brought to its newest complete version by
    [`~persistence.folder.recover`] (which also removes leftovers of interrupted saves); else the previous version
    an interrupted [`atomic_directory`] swap of an earlier release left beside it (with a warning); else None."""
    from .folder import MANIFEST_FILE, STAGING_PREFIX, recover

    path = Path(path)
    if path.is_dir():
        try:
            # A part of a composite folder (`memory/` of a SPRInG save) is recovered with its parent first: a crash
            # while the parent's save moved files can leave the part half old, half new.
            for ancestor in list(path.absolute().parents)[:2][::-1]:
                if (ancestor / MANIFEST_FILE).is_file() or any(ancestor.glob(f"{STAGING_PREFIX}*")):
                    recover(ancestor)
            recover(path)
        except PermissionError as err:  # a read-only copy: read what is there
            logger.warning(f"cannot recover {path} ({err}); reading it as it is.")
        return path
    leftovers = sorted(path.parent.glob(f".{path.name}{OLD_SUFFIX}*")) if path.parent.is_dir() else []
    if leftovers:  # a save was interrupted between its two renames: the previous version is intact here
        logger.warning(f"{path} is missing; loading the previous version from {leftovers[-1]}.")
        return leftovers[-1]
    return None


def looks_like_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id rather than a (missing) local path."""
    return not (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or Path(name).exists())
