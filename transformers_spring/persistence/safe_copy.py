"""Copying a folder the library did not write: only regular files and folders inside it, never through a link.

A saved folder may come from the Hub or a colleague. A symlink in it (a file, or a whole subfolder) pointing
elsewhere would otherwise pull an outside file (a key, another user's adapter) into an offload directory, the next
save, a merged state or a serving export. Every copy of a folder the library reads goes through [`copy_tree`]."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class UnsafeFolderError(ValueError):
    """A folder to copy holds a symlink or something that is neither a file nor a folder."""


def check_tree(source: str | os.PathLike, *, what: str = "folder") -> list[Path]:
    """The regular files under `source` (relative paths, sorted), after checking that `source` itself and every entry
    under it is a real folder or a regular file: no symlink, device, socket or FIFO.

    Args:
        source (`str` or `os.PathLike`): the folder.
        what (`str`, *optional*): what the folder is, for the error message (e.g. `"the adapter of 'alice'"`).

    Raises:
        `UnsafeFolderError`: naming the offending path.
    """
    root = Path(source)
    if root.is_symlink() or not root.is_dir():
        raise UnsafeFolderError(f"{what} {root} is a symlink or not a folder; it is not read.")
    files: list[Path] = []
    for current, dirs, names in os.walk(root, followlinks=False):
        here = Path(current)
        for name in dirs:
            if (here / name).is_symlink():
                raise UnsafeFolderError(f"{what} holds a symlinked folder, {here / name}; it is not read.")
        for name in names:
            path = here / name
            if path.is_symlink() or not path.is_file():
                raise UnsafeFolderError(f"{what} holds {path}, which is a symlink or not a regular file.")
            files.append(path.relative_to(root))
    return sorted(files)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike, *, what: str = "folder") -> Path:
    """Copies the folder `source` to `target` (merged into it when it exists) after [`check_tree`]: regular files
    only, byte for byte, never through a link.

    Args:
        source (`str` or `os.PathLike`): the folder to copy.
        target (`str` or `os.PathLike`): where it goes.
        what (`str`, *optional*): what the folder is, for error messages.

    Returns:
        `Path`: `target`.
    """
    files = check_tree(source, what=what)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        # `follow_symlinks=False`: a file swapped for a link after the check is copied as a link, never followed.
        shutil.copyfile(Path(source) / relative, destination, follow_symlinks=False)
    return target
