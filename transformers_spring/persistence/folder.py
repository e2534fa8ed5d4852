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

Many threads and processes on one folder: a save holds the folder's lock exclusively for its whole duration, so two
saves are serialized (the second waits, up to `LOCK_TIMEOUT` seconds, then raises a `TimeoutError` naming the
folder). A recovery takes the lock shared, and exclusively only when there is something to roll forward or remove, so
it never takes a live save's staging folder for a crashed one. Within a process the lock is a thread lock; across
processes it is an OS lock (`fcntl.flock`) on the file `.spring-lock` in the folder, which the OS releases when its
holder dies (a `kill -9` never leaves a folder locked). The last holder removes that file, so a folder at rest holds
exactly what the save wrote. Recovery releases the lock when it returns: a loader that reads the folder's files after
it holds [`reading`] around the read, so that no save of another process replaces them midway. Without `fcntl`
(Windows), only the thread lock guards a folder, as before: two processes on one folder are not supported there.

This module imports only the standard library, so that crash tests can run it in a bare subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, only the in-process thread lock guards a folder (see the module docstring)
    fcntl = None

MANIFEST_FILE = "spring_manifest.json"
MANIFEST_VERSION = 1
STAGING_PREFIX = ".spring-staging-"
COMPLETE_MARKER = ".spring-complete"
TMP_INFIX = ".spring-tmp-"
LOCK_FILE = ".spring-lock"
# How long a save or a load waits for another process's save of the same folder before giving up, in seconds.
LOCK_TIMEOUT = 600.0
# Siblings the directory-swap saves of transformers_spring < 0.3 could leave behind (removed by the next save).
LEGACY_SIBLING_PATTERNS = (".{name}.tmp-*", ".{name}.spring-old-*")


class _FolderLock:
    """A folder's lock within this process: a thread lock (re-entrant, so a save or a read may recover the folder it
    holds), and the descriptor of the OS lock on `LOCK_FILE` while a thread holds it (None: not held, or no OS lock
    here). Descriptors of one file conflict even within a process, so a process takes the OS lock once per folder."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.fd: int | None = None
        self.exclusive = False
        self.depth = 0


_LOCKS: dict[str, _FolderLock] = {}
_LOCKS_GUARD = threading.Lock()
# Staging folders this process is writing: a composite save's part (written into the outer staging folder) is
# committed by the outer save.
_ACTIVE_STAGING: set[str] = set()
# Filesystems that cannot lock (some network mounts): such a folder is guarded by the thread lock only.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _folder_lock(target: Path) -> _FolderLock:
    key = str(target.absolute())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, _FolderLock())


@contextmanager
def _locked(target: Path, exclusive: bool) -> Iterator[None]:
    """Holds `target`'s lock (see the module docstring), shared or exclusive; nested in the same thread, the held
    lock is reused (and made exclusive if asked)."""
    lock = _folder_lock(target)
    with lock.thread_lock:
        outermost = lock.depth == 0
        if outermost:
            lock.fd, lock.exclusive = _os_lock(target, exclusive), exclusive
        elif exclusive and not lock.exclusive:
            if lock.fd is not None:
                # Not atomic (flock drops the shared lock first): the callers re-read the folder once exclusive.
                _flock(lock.fd, target, True, time.monotonic() + LOCK_TIMEOUT)
            lock.exclusive = True
        lock.depth += 1
        try:
            yield
        finally:
            lock.depth -= 1
            if outermost:
                fd, lock.fd = lock.fd, None
                if fd is not None:
                    _os_unlock(target, fd)


def _os_lock(target: Path, exclusive: bool) -> int | None:
    """A descriptor of `target/LOCK_FILE` locked with `flock`, or None where no OS lock can be taken."""
    if fcntl is None:
        return None
    path, deadline = target / LOCK_FILE, time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError:  # a read-only folder (nobody saves into it through this library) or a symlink in the way
            return None
        try:
            _flock(fd, target, exclusive, deadline)
            # The last holder removes the file: a lock won on a removed file guards nothing, so retry on the new one.
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                return fd
        except FileNotFoundError:
            pass
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_LOCKING:
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _flock(fd: int, target: Path, exclusive: bool, deadline: float) -> None:
    """`flock`, polled rather than blocking so that a wait can end with an error that names the folder."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, mode)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{target} is locked by another process's save or read (its {LOCK_FILE} has been held for more than "
                    f"{LOCK_TIMEOUT:.0f} s); wait for that save to finish, or save into another folder."
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.05)


def _os_unlock(target: Path, fd: int) -> None:
    """Releases the OS lock; the last holder out removes the lock file, so that no save or load leaves it behind."""
    path = target / LOCK_FILE
    try:
        # Removing needs the lock exclusively: a holder or waiter that opened the file meanwhile retries on a new
        # one (see `_os_lock`). If another process holds it, the conversion fails and that holder removes it later.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step(name: str) -> None:
    """A named point of the save protocol. Does nothing; crash tests replace it to kill the process there."""


class UnsafeSaveError(ValueError):
    """A save that would touch files it does not own, or a folder no save may write into."""


def check_save_directory(directory: str | os.PathLike, argument: str = "save_directory") -> Path:
    """The absolute path of a folder a save may write into.

    Refuses what is not a path, a path that is a file or whose parent is a file, a path whose last component is `.`
    or `..`, the working directory or any folder above it, the home directory and a filesystem root (a save there
    would mix its files with the user's own).

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
    with contextlib.suppress(OSError):
        if resolved in Path.cwd().resolve().parents:
            raise UnsafeSaveError(
                f"`{argument}` ({target}) is a folder above the working directory; save into a folder of its own."
            )
    for name, special in (("working directory", Path.cwd()), ("home directory", Path.home())):
        with contextlib.suppress(OSError):
            if resolved == special.resolve():
                raise UnsafeSaveError(f"`{argument}` ({target}) is the {name}; save into a folder of its own.")
    if os.path.basename(text.rstrip("/" + os.sep)) in (".", ".."):  # pathlib drops a trailing `.`: read the text
        raise UnsafeSaveError(f"`{argument}` ({directory!r}) ends in `.` or `..`; save into a folder of its own.")
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
    if name == MANIFEST_FILE or any(part.startswith((STAGING_PREFIX, COMPLETE_MARKER, LOCK_FILE)) for part in parts):
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
    with _locked(target, exclusive=False):
        if not _has_leftovers(target):  # the common case: readers share the lock
            return read_manifest(target)
        with _locked(target, exclusive=True):
            return _recover(target)


@contextmanager
def reading(directory: str | os.PathLike) -> Iterator[dict | None]:
    """Holds a folder at one version while its files are read: recovers it (see [`recover`]), then holds its lock
    shared until the block exits, so that no save (of this process or another) replaces a file midway through the
    read. Other reads go on meanwhile; saves wait.

    Args:
        directory (`str` or `os.PathLike`): the folder.

    Yields:
        `dict` or `None`: the manifest after recovery (None for a folder without one, or no folder).
    """
    target = Path(directory)
    if not target.is_dir():
        yield None
        return
    with _locked(target, exclusive=False):
        yield recover(target)


def _has_leftovers(target: Path) -> bool:
    """Whether an interrupted save left anything for recovery (a save in flight holds the lock, so under it every
    staging folder of another thread or process is a leftover)."""
    return bool(_staging_folders(target)) or any(target.glob(f".*{glob.escape(TMP_INFIX)}*"))


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
    with _locked(target, exclusive=True):  # a second save of the folder waits for this one (LOCK_TIMEOUT)
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
        _check_manifest(marker, staging / COMPLETE_MARKER)  # no reserved name (the lock file) among the files
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
