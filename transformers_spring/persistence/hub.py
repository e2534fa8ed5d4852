"""Where a `from_pretrained` finds its folder: a local directory (recovered first, see
[`~persistence.folder.recover`]) or a Hub repo snapshot. The one resolver of every loader."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .atomic import looks_like_repo_id, resolve_saved_directory


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    marker: str,
    kind: str,
    probe: bool = False,
    allow_patterns: Sequence[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path | None:
    """The local folder of a saved `kind`: `name_or_path` itself when it is a directory, else a snapshot of the Hub
    repo of that id (offline from the cache with `HF_HUB_OFFLINE=1`).

    Args:
        name_or_path (`str` or `os.PathLike`): a directory or a Hub repo id.
        marker (`str`): the file every folder of this kind holds (e.g. `"spring_config.json"`).
        kind (`str`): what is loaded, for error messages (e.g. `"LoGoMemory"`).
        probe (`bool`, *optional*, defaults to `False`): return None instead of raising when `name_or_path` is not
            a folder of this kind (a directory without `marker`, or a repo without it): for loaders that also accept
            plain model ids.
        allow_patterns (`Sequence[str]`, *optional*): the repo files to download (default: all).
        revision, token, cache_dir, force_download, local_files_only: Hub options.

    Raises:
        `FileNotFoundError`: (without `probe`) no such directory or repo, or it holds no `marker`.
    """
    path = os.fspath(name_or_path)
    local = resolve_saved_directory(path)
    if local is not None:
        if (local / marker).is_file():
            return local
        if probe:
            return None
        raise FileNotFoundError(f"{local} has no {marker}; it is not a {kind} directory.")
    if not looks_like_repo_id(path):
        if probe:
            return None
        raise FileNotFoundError(f"no {kind} directory at {path}.")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    hub = dict(revision=revision, token=token, cache_dir=cache_dir, force_download=force_download,
               local_files_only=local_files_only)  # fmt: skip
    if probe:
        try:
            hf_hub_download(path, marker, **hub)
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError):
            return None  # not a repo of this kind (or unreachable)
    return Path(snapshot_download(path, allow_patterns=list(allow_patterns) if allow_patterns else None, **hub))
