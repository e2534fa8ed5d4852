"""Saving into a folder the user owns: a save writes and replaces only the files it owns, never deletes anything
else, and survives a crash at any point.

How a save commits (generation `G` = the previous one + 1):

1. the files are written into a staging folder inside the target, `.spring-staging-<G>-<random>/`;
2. a completion marker (`.spring-complete`: the generation and the list of files) is written into it, atomically
   and last: from here on the staged version is complete and recovery rolls it forward;
3. every staged file replaces its namesake in the target (`os.replace`, one file at a time); files the previous
   generation owned and this one does not are removed;
4. the manifest `spring_manifest.json` (generation, type, the owned files) is written atomically: the commit;
5. the staging folder is removed.

Recovery (at the start of every save and load) takes the newest complete version by generation number, never by
name: a complete staged generation above the manifest's is rolled forward (steps 3–5 are idempotent), and every
incomplete or already-committed staging folder is removed, with any temporary files. So after a crash at any point
the next save or load sees the newest complete version and no leftover survives it.

This module imports only the standard library, so that crash tests can run it in a bare subprocess.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST_FILE = "spring_manifest.json"
MANIFEST_VERSION = 1
STAGING_PREFIX = ".spring-staging-"
COMPLETE_MARKER = ".spring-complete"
TMP_INFIX = ".spring-tmp-"
# Siblings the directory-swap saves of transformers_spring < 0.3 could leave behind (removed by the next save).
LEGACY_SIBLING_PATTERNS = (".{name}.tmp-*", ".{name}.spring-old-*")


# One lock per folder within a process: a save and a load's recovery of the same folder never interleave, and a
# recovery never takes another thread's in-flight staging folder for a crashed one. (Two processes saving into one
# folder at once are not supported.)
_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()
_ACTIVE_STAGING: set[str] = set()


def _folder_lock(target: Path) -> threading.RLock:
    key = str(target.absolute())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.RLock())


def _step(name: str) -> None:
    """A named point of the save protocol. Does nothing; crash tests replace it to kill the process there."""


class UnsafeSaveError(ValueError):
    """A save that would touch files it does not own, or a folder no save may write into."""


def check_save_directory(directory: str | os.PathLike, argument: str = "save_directory") -> Path:
    """The absolute path of a folder a save may write into.

    Refuses what is not a path, a path that is a file or whose parent is a file, the working directory, the home
    directory and a filesystem root (a save there would mix its files with the user's own).

    Args:
        directory (`str` or `os.PathLike`): the folder.
        argument (`str`, *optional*, defaults to `"save_directory"`): the argument's name, for the error messages.
    """
    if isinstance(directory, bool) or not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`{argument}` must be a str or os.PathLike path, got {type(directory).__name__}.")
    text = os.fspath(directory)
    if isinstance(text, bytes) or not text.strip():
        raise ValueError(f"`{argument}` must be a non-empty path, got {directory!r}.")
    if "\x00" in text:
        raise ValueError(f"`{argument}` contains a NUL character: {directory!r}.")
    target = Path(text).expanduser().absolute()
    resolved = target.resolve()
    if resolved == Path(resolved.anchor):
        raise UnsafeSaveError(f"`{argument}` ({target}) is a filesystem root; save into a folder of its own.")
    for name, special in (("working directory", Path.cwd()), ("home directory", Path.home())):
        with contextlib.suppress(OSError):
            if resolved == special.resolve():
                raise UnsafeSaveError(f"`{argument}` ({target}) is the {name}; save into a folder of its own.")
    if target.exists() and not target.is_dir():
        raise UnsafeSaveError(f"`{argument}` ({target}) is a file, not a folder.")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UnsafeSaveError(f"`{argument}` ({target}): its parent {parent} is a file, not a folder.")
            break
    return target


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The folder's manifest (`generation`, `type`, `files`), or None when it has none (never saved by this
    library, or saved by a version before manifests)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable manifest ({err}).") from err
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object.")
    generation = manifest.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise ValueError(f"{path}: field 'generation' must be a non-negative int, got {generation!r}.")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path}: field 'files' must be a list of relative paths.")
    for name in files:
        _check_relative(name, path, "files")
    components = manifest.get("components", [])
    if not isinstance(components, list):
        raise ValueError(f"{path}: field 'components' must be a list.")
    for component in components:
        if not isinstance(component, dict) or not all(
            isinstance(component.get(key), str) for key in ("name", "path", "type")
        ):
            raise ValueError(f"{path}: each of 'components' needs a str 'name', 'path' and 'type'.")
        if component["path"] != ".":
            _check_relative(component["path"], path, "components.path")


def component(manifest: dict | None, name: str) -> dict | None:
    """The manifest's component called `name` (`{"name", "path", "type", ...}`), or None."""
    for entry in (manifest or {}).get("components", []):
        if entry["name"] == name:
            return entry
    return None


def _check_relative(name: str, where: Path, field: str) -> None:
    """A path from a file must stay inside its folder: relative, no `..`, no NUL, not the manifest itself."""
    parts = Path(name).parts
    if not name or os.path.isabs(name) or "\x00" in name or ".." in parts or name != Path(name).as_posix():
        raise ValueError(f"{where}: field {field!r} holds the unsafe path {name!r}.")
    if name == MANIFEST_FILE or any(part.startswith((STAGING_PREFIX, COMPLETE_MARKER)) for part in parts):
        raise ValueError(f"{where}: field {field!r} holds the reserved path {name!r}.")


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically: a temporary file in the same directory, then `os.replace`, so a reader (or
    a crash) never sees a half-written file and an existing file is only replaced by a complete one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_INFIX}{uuid.uuid4().hex[:12]}"  # a name recovery knows to remove
    # Mode 0o666 through os.open: the kernel applies the umask, so the file gets the permissions open() would give
    # (and no thread ever sees a changed process umask).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)  # the rename itself on disk too
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """[`atomic_write_bytes`] of `text` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _listed_files(root: Path) -> list[str]:
    """Every file under `root` as sorted POSIX relative paths (the marker excluded); symlinks are refused."""
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise UnsafeSaveError(f"the save wrote a symlink ({path}); only regular files are saved.")
        if path.is_file() and path.name != COMPLETE_MARKER:
            files.append(path.relative_to(root).as_posix())
    return files


def _read_marker(staging: Path) -> dict | None:
    try:
        marker = json.loads((staging / COMPLETE_MARKER).read_text(encoding="utf-8"))
        _check_manifest(marker, staging / COMPLETE_MARKER)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return marker


def _staging_folders(target: Path) -> list[Path]:
    if not target.is_dir():
        return []
    return [p for p in target.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink()]


def _remove(path: Path) -> None:
    _step("cleanup")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _roll_forward(target: Path, staging: Path, marker: dict, previous: dict | None, kind: str | None) -> None:
    """Steps 3–5 for a complete staged generation; idempotent, so a crash inside it is recovered by running it
    again."""
    for name in marker["files"]:
        source, destination = staging / name, target / name
        if source.is_file():  # not yet moved (a moved file is already in place)
            if not _inside(target, destination.parent):
                raise UnsafeSaveError(f"cannot save {name!r}: a symlink in {target} is in its way.")
            if destination.is_dir() and not destination.is_symlink():
                raise UnsafeSaveError(f"cannot save {name!r}: {destination} is a folder the save does not own.")
            destination.parent.mkdir(parents=True, exist_ok=True)
            _step("replace")
            os.replace(source, destination)
    new = set(marker["files"])
    for name in (previous or {}).get("files", []):
        old = target / name
        # The previous generation's only: ours to remove, if it is still the regular file we wrote.
        if name not in new and _inside(target, old.parent) and old.is_file() and not old.is_symlink():
            _step("remove-old")
            _remove(old)
            _prune_empty_parents(target, old.parent)
    _fsync_directory(target)
    _step("manifest")
    manifest = {"format_version": MANIFEST_VERSION, "generation": marker["generation"], "files": marker["files"]}
    if marker.get("type") or kind:
        manifest["type"] = marker.get("type") or kind
    if marker.get("components"):
        manifest["components"] = marker["components"]
    _write_json_atomic(target / MANIFEST_FILE, manifest)
    _step("committed")
    _remove(staging)


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` is under `root` with no symlink on the way (so removing it cannot reach outside)."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return False
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            return False
    return True


def _prune_empty_parents(root: Path, directory: Path) -> None:
    """Removes folders a removed owned file leaves empty, up to `root` (never a folder with anything in it)."""
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def recover(directory: str | os.PathLike) -> dict | None:
    """Brings a folder to its newest complete version and removes every leftover of interrupted saves.

    A complete staged generation newer than the manifest's is rolled forward; incomplete or already-committed
    staging folders and temporary files are removed. Safe to call on any folder: it touches only names this module
    reserves (`.spring-staging-*`, `.*.spring-tmp-*`) and files a manifest lists.

    Args:
        directory (`str` or `os.PathLike`): the folder.

    Returns:
        `dict` or `None`: the manifest after recovery (None for a folder without one).
    """
    target = Path(directory)
    if not target.is_dir():
        return None
    with _folder_lock(target):
        return _recover(target)


def _recover(target: Path) -> dict | None:
    manifest = read_manifest(target)
    current = manifest["generation"] if manifest else 0
    complete = []
    for staging in _staging_folders(target):
        if str(staging.absolute()) in _ACTIVE_STAGING:  # this process is writing it right now
            continue
        marker = _read_marker(staging)
        if marker is not None and marker["generation"] > current:
            complete.append((marker["generation"], staging, marker))
        else:
            _remove(staging)  # incomplete (crashed while writing) or already committed
    complete.sort(key=lambda entry: entry[0])
    for _, staging, _ in complete[:-1]:  # an older complete version than the newest: superseded
        _remove(staging)
    if complete:
        _, staging, marker = complete[-1]
        _roll_forward(target, staging, marker, manifest, None)
        manifest = read_manifest(target)
    for tmp in target.glob(f".*{glob.escape(TMP_INFIX)}*"):
        _remove(tmp)
    return manifest


@contextmanager
def save_folder(
    directory: str | os.PathLike,
    kind: str | None = None,
    *,
    adopt: Callable[[Path], bool] | None = None,
    argument: str = "save_directory",
    components: Callable[[Path], list[dict]] | None = None,
) -> Iterator[Path]:
    """Yields an empty staging folder to write a save's files into; on a clean exit they replace their namesakes in
    `directory` (see the module docstring); on an error nothing in `directory` changes.

    Files already in `directory` that no earlier save listed in its manifest are never deleted or overwritten: a
    staged file that would replace one raises [`UnsafeSaveError`] naming it, unless `adopt(directory)` says the
    folder is a save of an earlier version of this library (which wrote no manifest).

    Args:
        directory (`str` or `os.PathLike`): the target folder (created if needed; see [`check_save_directory`]).
        kind (`str`, *optional*): what is saved (e.g. `"LoGoMemory"`), recorded in the manifest.
        adopt (`Callable[[Path], bool]`, *optional*): whether a folder without a manifest is an earlier save whose
            files may be replaced.
        argument (`str`, *optional*, defaults to `"save_directory"`): the argument's name, for error messages.
        components (`Callable[[Path], list[dict]]`, *optional*): for a composite folder, given the filled staging
            folder, its parts as `{"name", "path", "type"}` entries (sentence-transformers' `modules.json` style),
            recorded in the manifest so that a loader can dispatch on each part's type.

    Yields:
        `Path`: the staging folder.
    """
    target = check_save_directory(directory, argument)
    target.mkdir(parents=True, exist_ok=True)
    if any(str(parent) in _ACTIVE_STAGING for parent in target.parents):
        # A part of a composite save (the memory inside a SPRInG folder): the outer save's staging, marker and
        # manifest already make it atomic, so a second commit inside it would only repeat the work.
        yield target
        return
    with _folder_lock(target):
        yield from _save(target, kind, adopt, argument, components)


def _fsync_tree(root: Path) -> None:
    """Every staged file and folder on disk before the marker: after a power loss a marker never vouches for a
    file that is not there."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_directory(path)
    _fsync_directory(root)


def _save(target: Path, kind, adopt, argument: str, components) -> Iterator[Path]:
    manifest = _recover(target)
    generation = (manifest["generation"] if manifest else 0) + 1
    staging = target / f"{STAGING_PREFIX}{generation}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    _ACTIVE_STAGING.add(str(staging.absolute()))
    try:
        _step("staging")
        yield staging
        files = _listed_files(staging)
        owned = set(manifest["files"]) if manifest else set()
        adopted = manifest is None and adopt is not None and adopt(target)
        for name in files:
            destination = target / name
            if not _inside(target, destination.parent) or (destination.is_dir() and not destination.is_symlink()):
                raise UnsafeSaveError(
                    f"`{argument}` ({target}): cannot save {name!r}, the folder holds a folder or symlink in its way."
                )
            for parent in destination.parents:
                if parent == target:
                    break
                if parent.exists() and not parent.is_dir():
                    raise UnsafeSaveError(f"`{argument}` ({target}): cannot save {name!r}, {parent} is a file.")
        clashes = [name for name in files if name not in owned and os.path.lexists(target / name)]
        if clashes and not adopted:
            raise UnsafeSaveError(
                f"`{argument}` ({target}) already holds {', '.join(sorted(clashes)[:5])}"
                f"{' and more' if len(clashes) > 5 else ''}, which no earlier save wrote; saving would overwrite them. "
                "Save into another folder, or move them away."
            )
        marker = {"format_version": MANIFEST_VERSION, "generation": generation, "files": files}
        if kind:
            marker["type"] = kind
        if components is not None:
            marker["components"] = components(staging)
            _check_manifest(marker, staging / COMPLETE_MARKER)
        _fsync_tree(staging)
        _step("marker")
        _write_json_atomic(staging / COMPLETE_MARKER, marker)
        _step("complete")
        _roll_forward(target, staging, marker, manifest, kind)
    finally:
        _ACTIVE_STAGING.discard(str(staging.absolute()))
        if staging.exists() and _read_marker(staging) is None:  # failed before completion: drop it
            shutil.rmtree(staging, ignore_errors=True)
    for pattern in LEGACY_SIBLING_PATTERNS:
        for leftover in target.parent.glob(pattern.format(name=glob.escape(target.name))):
            _remove(leftover)
