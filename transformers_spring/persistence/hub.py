"""Where a `from_pretrained` finds its folder: a local directory (recovered first, see
[`~persistence.folder.recover`]) or a Hub repo snapshot. The one resolver of every loader."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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
        `FileNotFoundError`: (without `probe`) no such directory or repo, or it holds no `marker`. For a name that is
        neither a local directory nor a Hub repo that can be read (offline and not cached, no such repo, not a valid
        id), the message leads with the missing local folder, then says why the Hub did not have it either.
    """
    path = os.fspath(name_or_path)
    local = resolve_saved_directory(path)
    if local is not None:
        if (local / marker).is_file():
            return local
        if probe:
            return None
        raise FileNotFoundError(f"{local} has no {marker}; it is not a {kind} directory.")
    # A typo'd local path is the likelier mistake than a typo'd repo id: the message leads with the folder.
    missing = f"no local folder {path!r} ({Path(path).absolute()}) to load the {kind} from"
    if not looks_like_repo_id(path):
        if probe:
            return None
        if Path(path).exists():
            raise FileNotFoundError(f"{missing}: it is a file, not a {kind} directory.")
        raise FileNotFoundError(f"{missing}; as a path it cannot be a Hub repo id ('name' or 'owner/name') either.")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    hub = dict(revision=revision, token=token, cache_dir=cache_dir, force_download=force_download,
               local_files_only=local_files_only)  # fmt: skip
    if probe:
        try:
            hf_hub_download(path, marker, **hub)
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError):
            return None  # not a repo of this kind (or unreachable)
    try:
        return Path(snapshot_download(path, allow_patterns=list(allow_patterns) if allow_patterns else None, **hub))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as err:
        reason = _hub_miss_reason(err, local_files_only, cache_dir)
        if reason is None:  # a real repo the Hub answered for (wrong revision, gated...): its error is the right one
            raise
        raise FileNotFoundError(f"{missing}; tried as a Hub repo id too, {reason}.") from err


def _hub_miss_reason(err: Exception, local_files_only: bool, cache_dir: str | os.PathLike | None) -> str | None:
    """Why `snapshot_download` found no repo, for [`resolve_folder`]'s message; None when the error is about a
    repo that exists (its own message is then the right one)."""
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(err, HFValidationError):
        return f"it is not a valid one ({str(err).rstrip('.')})"
    # Gated, or cached only in part (huggingface_hub >= 2): a repo that exists.
    exists = (GatedRepoError, getattr(errors, "IncompleteSnapshotError", GatedRepoError))
    if isinstance(err, exists) or not isinstance(err, (LocalEntryNotFoundError, RepositoryNotFoundError)):
        return None
    if isinstance(err, RepositoryNotFoundError):
        return "the Hub has no such repository (or it is private and the token cannot read it)"
    cache = f"the Hub cache ({cache_dir or constants.HF_HUB_CACHE})"
    if local_files_only:
        return f"it is not in {cache} and `local_files_only=True` forbids downloading it"
    if isinstance(err.__cause__, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        return f"it is not in {cache} and the Hub is offline (HF_HUB_OFFLINE=1)"
    cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ is not None else ""
    return f"it is not in {cache} and the Hub could not be reached{cause}"


def push_folder(
    save: Callable[[Path], object],
    repo_id: str,
    *,
    private: bool | None = True,
    token: str | bool | None = None,
    commit_message: str = "Upload with transformers-spring",
    revision: str | None = None,
    create_pr: bool = False,
    ignore_patterns: Sequence[str] | str | None = None,
    delete_patterns: Sequence[str] | str | None = None,
) -> object:
    """The one `push_to_hub` of the library: `save(folder)` writes into a fresh temporary folder, which is uploaded to
    `repo_id` in one commit (the repo is created if needed). The memory's machine-local ANN cache is never written
    into the upload, nor uploaded.

    Args:
        save (`Callable[[Path], object]`): writes the folder (usually the object's `save_pretrained`).
        repo_id (`str`): the Hub repo.
        private (`bool`, *optional*, defaults to `True`): whether a new repo is private (adapters and memories are
            derived from users' text); `None` leaves it to the Hub's default.
        token, commit_message, revision, create_pr: as for `HfApi.upload_folder`.
        ignore_patterns (`Sequence[str]` or `str`, *optional*): more files not to upload.
        delete_patterns (`Sequence[str]` or `str`, *optional*): repo files to delete in the same commit (a state's
            forgotten users).

    Returns:
        The `CommitInfo` of the upload.
    """
    import tempfile

    from huggingface_hub import HfApi

    from .memory_files import ANN_INDEX_FILE, no_ann_cache

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`repo_id` must be a non-empty Hub repo id, got {repo_id!r}.")
    ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
    delete = [delete_patterns] if isinstance(delete_patterns, str) else list(delete_patterns or [])
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="spring-push-") as tmp:
        folder = Path(tmp) / "upload"
        with no_ann_cache():
            save(folder)
        return api.upload_folder(
            repo_id=getattr(repo, "repo_id", repo_id),
            folder_path=str(folder),
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
            ignore_patterns=[*ignore, f"*{ANN_INDEX_FILE}"],
            **({"delete_patterns": delete} if delete else {}),
        )


class HubMixin:
    """The push half of the library's one save/load/push contract, shared by `SpringForCausalLM`,
    `ContinualPersonalizer` and `LoGoMemory` (each defines `save_pretrained(save_directory, ...)` and
    `from_pretrained`): `push_to_hub` saves into a fresh folder and uploads it through [`push_folder`], and
    `save_pretrained(..., push_to_hub=True, repo_id=None, **push_kwargs)` checks its push options before writing
    anything ([`_check_push_kwargs`]) and pushes the same save after it ([`_push_saved`])."""

    hub_commit_message: str = "Upload with transformers-spring"
    # Repo files deleted in the same commit, so the repo mirrors the save (forgotten users' adapters and memory).
    hub_delete_patterns: tuple[str, ...] = ()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = True,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        ignore_patterns: Sequence[str] | str | None = None,
    ):
        """Saves (`save_pretrained`) into a temporary folder and uploads it to `repo_id` in one commit (the repo is
        created if needed). The memory's machine-local ANN cache is never uploaded, and files matching
        `hub_delete_patterns` that this save does not hold are deleted from the repo in the same commit.

        Args:
            repo_id (`str`): the Hub repo.
            private (`bool`, *optional*, defaults to `True`): whether a new repo is private (adapters and memories
                are derived from users' text); `None` leaves it to the Hub's default.
            token (`str` or `bool`, *optional*): the Hub token.
            commit_message (`str`, *optional*): defaults to the class's `hub_commit_message`.
            revision (`str`, *optional*): the branch to push to.
            create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
            ignore_patterns (`Sequence[str]` or `str`, *optional*): more files not to upload.

        Returns:
            The `CommitInfo` of the upload.
        """
        options = dict(private=private, token=token, commit_message=commit_message, revision=revision,
                       create_pr=create_pr, ignore_patterns=ignore_patterns)  # fmt: skip
        return self._push(self.save_pretrained, repo_id, options)

    def _push_options(self, push_kwargs: dict) -> dict:
        """`push_to_hub`'s options from `push_kwargs`, defaults filled in; a name it does not take raises `TypeError`."""
        import inspect

        bound = inspect.signature(HubMixin.push_to_hub).bind(self, "repo_id", **push_kwargs)
        bound.apply_defaults()
        return {key: value for key, value in bound.arguments.items() if key not in ("self", "repo_id")}

    def _check_push_kwargs(self, push_to_hub: bool, push_kwargs: dict) -> None:
        """Checks `save_pretrained`'s `push_kwargs` before anything is written: a typo raises `TypeError` instead of
        costing a save or being dropped."""
        self._push_options(push_kwargs)
        if push_kwargs and not push_to_hub:
            from transformers.utils import logging

            logging.get_logger(__name__).warning(f"{sorted(push_kwargs)} are ignored: `push_to_hub` is False.")

    def _push_saved(self, save_directory: str | os.PathLike, repo_id: str | None, push_kwargs: dict, save=None):
        """`save_pretrained(..., push_to_hub=True)`'s push, to `repo_id` (default: the folder's name): through
        `push_to_hub`, or of `save` (`save_pretrained` with the same options) when the save took options
        `push_to_hub` cannot repeat."""
        repo_id = repo_id or Path(save_directory).absolute().name
        if save is None:
            return self.push_to_hub(repo_id, **push_kwargs)
        return self._push(save, repo_id, self._push_options(push_kwargs))

    def _push(self, save: Callable[[Path], object], repo_id: str, options: dict):
        """Uploads what `save(folder)` writes, with `push_to_hub`'s `options` (see [`push_folder`])."""
        options = dict(options, commit_message=options.get("commit_message") or self.hub_commit_message)
        return push_folder(save, repo_id, delete_patterns=self.hub_delete_patterns, **options)
