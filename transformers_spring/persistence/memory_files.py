"""The files of a saved `LoGoMemory`: their names and format version, how they are read, and every check a load
runs on them before anything is restored (types, ranges, consistency, size limits). `LoGoMemory` snapshots and
restores its own state; reading, writing and validating its files lives here, and how a state becomes these files
and back in [`~persistence.memory_format`]."""

from __future__ import annotations

import contextlib
import contextvars
import gc
import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from transformers.utils import logging

from ..records import Interaction

logger = logging.get_logger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE, RECORDS_FILE, EMBEDDINGS_FILE, CARD_FILE = (
    "config.json",
    "records.jsonl",
    "embeddings.safetensors",
    "README.md",
)
MEMORY_FILES = (CONFIG_FILE, RECORDS_FILE, EMBEDDINGS_FILE, CARD_FILE)  # what a Hub download fetches
# The global memory's hnswlib index, cached by a local save so that a load need not rebuild it. It is machine-local
# derived data read by C++ code: never uploaded to, downloaded from or loaded from the Hub, and used only when its
# checksums (of itself, of the shared embeddings and labels, and of the build parameters) match `config.json`.
ANN_INDEX_FILE = "ann_index.hnsw"
ANN_CACHE_MIN_ITEMS = 10_000  # below this a rebuild takes well under a second: no cache file

# Size limits on loaded files, so that a small edit cannot make a load allocate without bound or run for minutes.
MAX_CONFIG_BYTES = 64 * 2**20
MAX_RECORD_LINE_CHARS = 2**20  # one records.jsonl line (texts are capped at `max_text_chars` anyway)
MAX_RECORD_LINE_BYTES = 4 * MAX_RECORD_LINE_CHARS  # (UTF-8: at most 4 bytes a character)
MAX_BLANK_LINES = 1_024  # a save writes none; a hand edit may leave a few, a flood of them is refused
MAX_DIM = 65_536
MAX_GATE_HISTORY = 1_000_000
MAX_COMMUNITIES = 4_096
MAX_TENSOR_HEADER_BYTES = 2**20  # a saved header names at most six tensors: a few hundred bytes

# What `embeddings.safetensors` may hold, and with which dtypes; any other tensor is refused.
_FLOATS, _INTS = ("F16", "F32", "F64"), ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
TENSOR_DTYPES = {
    "embeddings": _FLOATS,
    "labels": _INTS,
    "gate_observed": _FLOATS,
    "gate_owner": _INTS,
    "match_pairs": _INTS,
    "community_centroids": _FLOATS,
}
_ITEM_BYTES = {"F16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "U16": 2, "U32": 4,
               "U64": 8}  # fmt: skip


def allowed_root(directory: Path) -> Path:
    """Where a loaded file may really live: the folder itself, or for a Hub cache snapshot
    (`.../models--org--name/snapshots/<rev>/...`, whose files are symlinks into `../../blobs/`) the repo's cache."""
    for folder in (directory, *directory.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
            return folder.parent.parent.resolve()
    return directory.resolve()


def check_file(path: Path, directory: Path) -> None:
    """A file a load reads must lie inside the folder (a symlink to another memory's, or any other, file is refused;
    the Hub cache's own symlinks into its blob store are fine)."""
    root = allowed_root(directory.absolute())
    if path.is_symlink() and root == directory.resolve():
        raise ValueError(f"{path.name} in {directory} is a symlink; refusing to read it.")
    if path.exists() and root not in path.resolve().parents:
        raise ValueError(f"{path.name} in {directory} lies outside the folder; refusing to read it.")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent} (is this a LoGoMemory directory?).")
    check_file(path, path.parent)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path.name} in {path.parent} is larger than {MAX_CONFIG_BYTES} bytes.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path.name} in {path.parent} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} in {path.parent} must hold a JSON object.")
    return data


def read_tensor_header(path: Path, dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors `embeddings.safetensors` declares, as `name -> (dtype, shape)`, checked from its JSON header
    before any tensor is read: known names and dtypes only, shapes that fit `dim` and each other, and data offsets
    that the file really holds (so a header cannot make a load allocate more than the file's size).

    Args:
        path (`Path`): the file. dim (`int`): `config.json`'s `dim`.
    """
    where = f"{EMBEDDINGS_FILE} in {path.parent}"
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_TENSOR_HEADER_BYTES, size - 8):
            raise ValueError(f"{where} is corrupt: its header length {length} is not within the file's {size} bytes.")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{where} is corrupt: its header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{where} is corrupt: its header is not a JSON object.")
    header.pop("__metadata__", None)  # (strings only: the safetensors reader checks it)
    data_bytes, out = size - 8 - length, {}
    for name, entry in header.items():
        if name not in TENSOR_DTYPES:
            raise ValueError(
                f"{where} holds an unknown tensor {name!r:.80}; a memory saves only {sorted(TENSOR_DTYPES)}."
            )
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        allowed = TENSOR_DTYPES[name]
        if dtype not in allowed:
            kind = "an integer" if allowed is _INTS else "a float"
            raise ValueError(f"{where}: tensor {name!r} has dtype {dtype!r:.20}; expected {kind} dtype {allowed}.")
        if not isinstance(shape, list) or not all(_int(n) and n >= 0 for n in shape):
            raise ValueError(f"{where}: tensor {name!r} has the malformed shape {shape!r:.80}.")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(n) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes
                or offsets[1] - offsets[0] != _ITEM_BYTES[dtype] * int(np.prod(shape, dtype=object))):  # fmt: skip
            raise ValueError(
                f"{where}: tensor {name!r} of shape {shape!r:.80} has data offsets {offsets!r:.80} outside the file."
            )
        out[name] = (dtype, tuple(shape))
    _check_tensor_shapes({name: shape for name, (_, shape) in out.items()}, dim, where)
    return out


def _check_tensor_shapes(shapes: dict[str, tuple[int, ...]], dim: int, where: str) -> None:
    """The shapes a save writes: `embeddings` `(n, dim)`, `labels` `(n,)`, `gate_observed` and `gate_owner` `(g,)`,
    `match_pairs` `(m, 2)` and `community_centroids` `(c, dim)`, within the limits on `g` and `c`."""
    if "embeddings" not in shapes or "labels" not in shapes:
        raise ValueError(f"{where} lacks the 'embeddings' or 'labels' tensor.")

    def refuse(name: str, expected: str) -> None:
        raise ValueError(f"{where}: tensor {name!r} has shape {shapes[name]}; expected {expected}.")

    if len(shapes["embeddings"]) != 2 or shapes["embeddings"][1] != dim:
        raise ValueError(
            f"embedding dim mismatch: {where}: tensor 'embeddings' has shape {shapes['embeddings']}, but "
            f"{CONFIG_FILE} says dim={dim}."
        )
    n, gates = shapes["embeddings"][0], shapes.get("gate_observed", (0,))
    if len(gates) != 1 or gates[0] > MAX_GATE_HISTORY:
        refuse("gate_observed", f"(g,) with g <= {MAX_GATE_HISTORY}")
    if shapes["labels"] != (n,):
        refuse("labels", f"({n},): one label per embedding")
    if shapes.get("gate_owner", gates) != gates:
        refuse("gate_owner", f"{gates}: one owner per 'gate_observed' score")
    if len(shapes.get("match_pairs", (0, 2))) != 2 or shapes.get("match_pairs", (0, 2))[1] != 2:
        refuse("match_pairs", "(m, 2): pairs of record positions")
    centroids = shapes.get("community_centroids", (0, dim))
    if len(centroids) != 2 or centroids[1] != dim or centroids[0] > MAX_COMMUNITIES:
        refuse("community_centroids", f"(c, {dim}) with c <= {MAX_COMMUNITIES}")


def read_tensors(directory: Path, dim: int) -> dict[str, np.ndarray]:
    """`embeddings.safetensors`, its header checked first (see [`read_tensor_header`]), its embeddings finite."""
    path = directory / EMBEDDINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{EMBEDDINGS_FILE} not found in {directory}.")
    check_file(path, directory)
    read_tensor_header(path, dim)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{EMBEDDINGS_FILE} in {directory} is corrupt: {err}") from err
    finite = np.isfinite(tensors["embeddings"]).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{EMBEDDINGS_FILE} in {directory}: 'embeddings' row {int(np.argmin(finite))} contains NaN or inf."
        )
    return tensors


def read_records(
    directory: Path, max_text_chars: int, expected: int, max_users: int | None = None
) -> list[tuple[Interaction, dict]]:
    """`records.jsonl`, streamed and checked line by line against what the other files say, so that an oversized or
    hostile file is refused without being read whole: its size must fit `expected` lines of at most
    `MAX_RECORD_LINE_CHARS`, and parsing stops at the first line past `expected` records, a line over the cap,
    invalid UTF-8 or JSON, a record that fails validation, an unknown region, a buffer score that is not a finite
    number, an id repeated for a user in one region, or a user past `config.json`'s `counts.users`. Errors name the
    line.

    Args:
        directory (`Path`): the memory folder.
        max_text_chars (`int`): the longest accepted prompt or response.
        expected (`int`): the record count (the rows of `embeddings.safetensors`, checked against the config).
        max_users (`int`, *optional*): `config.json`'s `counts.users` (None: a memory saved without counts).
    """
    path = directory / RECORDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{RECORDS_FILE} not found in {directory}.")
    check_file(path, directory)
    size, limit = path.stat().st_size, (expected + 1) * (MAX_RECORD_LINE_BYTES + 1)
    if size > limit:  # (before a byte is read: a 1 GiB file for 10 records costs nothing)
        raise ValueError(
            f"{RECORDS_FILE} in {directory} is {size} bytes, but {expected} records ({EMBEDDINGS_FILE}) of at most "
            f"{MAX_RECORD_LINE_CHARS} chars take at most {limit} bytes."
        )
    out, keys, users, blank, number = [], set(), set(), 0, 0
    with open(path, "rb") as f:  # (bytes: each line is decoded alone, so invalid UTF-8 is reported at its line)
        while raw := f.readline(MAX_RECORD_LINE_BYTES + 1):  # bounded: one edited line cannot fill memory
            number += 1
            where = f"{RECORDS_FILE} line {number} in {directory}"
            try:
                text = raw.decode("utf-8") if len(raw) <= MAX_RECORD_LINE_BYTES else None
            except UnicodeDecodeError as err:
                raise ValueError(f"{where} is not valid UTF-8 (byte {err.start}: {err.reason}).") from None
            if text is None or len(text) > MAX_RECORD_LINE_CHARS:
                raise ValueError(f"{where} is over {MAX_RECORD_LINE_CHARS} chars.")
            if not text.strip():
                blank += 1
                if blank > MAX_BLANK_LINES:
                    raise ValueError(f"{where}: more than {MAX_BLANK_LINES} blank lines.")
                continue
            if len(out) == expected:
                raise ValueError(f"{where}: more records than the {expected} embeddings of {EMBEDDINGS_FILE}.")
            record, line = _read_line(text, max_text_chars, where)
            key = (record.user_id, record.id, line.get("region", "history"))
            if key in keys:
                raise ValueError(f"{where}: field 'id' {record.id!r} repeats for user {record.user_id!r} ({key[2]}).")
            keys.add(key)
            users.add(record.user_id)
            if max_users is not None and len(users) > max_users:
                raise ValueError(
                    f"{where}: field 'user_id' {record.user_id!r} makes {len(users)} users, more than the {max_users} "
                    f"of {CONFIG_FILE}'s field 'counts.users'."
                )
            out.append((record, line))
    if len(out) != expected:
        raise ValueError(
            f"{RECORDS_FILE} has {len(out)} records but {EMBEDDINGS_FILE} has {expected} embeddings in {directory}."
        )
    return out


def _read_line(text: str, max_text_chars: int, where: str) -> tuple[Interaction, dict]:
    """One `records.jsonl` line as a validated record and its JSON object; errors name the line (`where`)."""
    try:
        line = json.loads(text)
        record = Interaction.from_dict(line, max_text_chars=max_text_chars)
    except (json.JSONDecodeError, TypeError, ValueError, RecursionError) as err:  # (RecursionError: [[[[...]]]])
        raise ValueError(f"{where}: {err}") from err
    if line.get("region", "history") not in ("history", "buffer"):
        raise ValueError(f"{where}: field 'region' must be 'history' or 'buffer', got {line.get('region')!r:.80}.")
    score = line.get("score")
    try:  # (a str or list is a TypeError, an int past float's range an OverflowError)
        finite = score is None or (not isinstance(score, bool) and math.isfinite(score))
    except (TypeError, OverflowError):
        finite = False
    if not finite:
        raise ValueError(f"{where}: field 'score' must be a finite number or absent, got {score!r:.80}.")
    return record, line


def is_memory_folder(directory: Path) -> bool:
    """Whether a folder without a manifest holds a memory saved by an earlier release (its files may be replaced)."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and {"format_version", "encoder", "next_label"} <= set(config)


def gate_owners(config: dict, tensors: dict, n: int) -> list[str | None] | None:
    """The gate scores' owners from `gate_users` (config) and `gate_owner` (tensor), checked; None for a memory
    saved before owners were kept."""
    if "gate_owner" not in tensors:
        return None
    users, index = config.get("gate_users", []), tensors["gate_owner"]  # (types checked by `check_config`)
    if index.ndim != 1 or index.shape[0] != n:
        raise ValueError(f"{EMBEDDINGS_FILE}: 'gate_owner' must hold one index per gate score ({n}).")
    if index.size and (index.min() < -1 or index.max() >= len(users)):
        raise ValueError(f"{EMBEDDINGS_FILE}: 'gate_owner' indexes outside {CONFIG_FILE}'s 'gate_users'.")
    return [users[i] if i >= 0 else None for i in index.tolist()]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: dict, path: Path) -> None:
    """Types and ranges of `config.json`'s fields (the constructor checks the settings it receives)."""
    dim = config["dim"]
    if not _int(dim) or not 1 <= dim <= MAX_DIM:
        raise ValueError(f"{path}: field 'dim' must be an int in [1, {MAX_DIM}], got {dim!r}.")
    next_label = config["next_label"]
    if not _int(next_label) or not 0 <= next_label < 2**62:
        raise ValueError(f"{path}: field 'next_label' must be a non-negative int, got {next_label!r}.")
    sharing = config.get("sharing", {})
    if not isinstance(sharing, dict):
        raise ValueError(f"{path}: field 'sharing' must be an object of user id -> bool.")
    for user, share in sharing.items():
        if not isinstance(share, bool):  # "false" (a string) would read as true
            raise ValueError(f"{path}: field 'sharing.{user}' must be true or false, got {share!r}.")
    for key in ("use_global",):
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"{path}: field {key!r} must be true or false, got {config[key]!r}.")
    for key, low, high in (("capacity", 1, 2**31), ("buffer_size", 0, 2**31), ("min_community_users", 1, 2**31),
                           ("n_communities", 1, MAX_COMMUNITIES)):  # fmt: skip
        value = config.get(key)
        if value is not None and (not _int(value) or not low <= value <= high):
            raise ValueError(f"{path}: field {key!r} must be an int in [{low}, {high}] or null, got {value!r}.")
    # The sharing rule (absent in memories saved before it: the defaults apply); null is not a value here.
    for key, low, high in (("min_contributors", 1, 2**31), ("max_matches", 1, 2**31), ("exact_match_below", 0, 2**62)):
        if key in config and (not _int(config[key]) or not low <= config[key] <= high):
            raise ValueError(f"{path}: field {key!r} must be an int in [{low}, {high}], got {config[key]!r}.")
    threshold = config.get("match_threshold", 0.75)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"{path}: field 'match_threshold' must be a number in (0, 1], got {threshold!r}.")
    communities = config.get("communities")
    if communities is not None:
        if not isinstance(communities, dict) or not isinstance(communities.get("user_community", {}), dict):
            raise ValueError(f"{path}: field 'communities' must be an object with a 'user_community' object.")
        sizes = communities.get("sizes", [])
        if not isinstance(sizes, list) or len(sizes) > MAX_COMMUNITIES or not all(_int(n) and n >= 0 for n in sizes):
            raise ValueError(f"{path}: field 'communities.sizes' must list at most {MAX_COMMUNITIES} counts.")
        for user, community in communities.get("user_community", {}).items():
            if not _int(community) or not -1 <= community < max(len(sizes), 1):
                raise ValueError(f"{path}: field 'communities.user_community.{user}' is out of range: {community!r}.")
        if communities:  # (a load restores these two with the rest)
            if not _int(communities.get("clustered_items")) or communities["clustered_items"] < 0:
                raise ValueError(f"{path}: field 'communities.clustered_items' must be a non-negative int.")
            if not isinstance(communities.get("stale"), bool):
                raise ValueError(f"{path}: field 'communities.stale' must be true or false.")
    counts = config.get("counts", {})  # (a memory saved without counts is checked against its embeddings alone)
    if not isinstance(counts, dict):
        raise ValueError(f"{path}: field 'counts' must be an object of counts, got {counts!r:.80}.")
    for key in ("users", "records", "buffer_records", "shared_records"):
        if key in counts and (not _int(counts[key]) or not 0 <= counts[key] < 2**62):
            raise ValueError(f"{path}: field 'counts.{key}' must be a non-negative int, got {counts[key]!r:.80}.")
    users = config.get("gate_users", [])
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise ValueError(f"{path}: field 'gate_users' must be a list of user ids.")


def check_loaded(
    config: dict,
    lines: list,
    tensors: dict,
    directory: Path,
    *,
    dim: int,
    capacity: int | None,
    share_by_default: bool,
    buffer_size: int | None = None,
) -> None:
    """Consistency of the loaded files with each other, before anything is restored: labels, counts, norms, the
    capacity and buffer size, opted-out users and community state (dtypes and shapes were checked from the
    tensors' header). Errors name the file and field."""
    embeddings, labels = tensors["embeddings"], tensors["labels"]
    where = f"{EMBEDDINGS_FILE} in {directory}"
    # float32 sums of squares: exact enough for a 1e-3 tolerance, and no float64 copy of every embedding
    e32 = embeddings.astype(np.float32, copy=False)  # a float16 file is checked in float32 too
    norms = np.sqrt(np.einsum("ij,ij->i", e32, e32)) if len(embeddings) else np.empty(0)
    if norms.size and np.abs(norms - 1.0).max() > 1e-3:
        row = int(np.abs(norms - 1.0).argmax())
        raise ValueError(f"{where}: 'embeddings' row {row} has norm {norms[row]:.4g}; stored vectors are unit-norm.")
    next_label = config["next_label"]
    history = [i for i, (_, line) in enumerate(lines) if line.get("region", "history") == "history"]
    is_history = np.zeros(len(lines), dtype=bool)
    is_history[history] = True
    if (labels[~is_history] != -1).any():
        raise ValueError(f"{where}: 'labels' of buffer records must be -1 (buffers are never shared).")
    shared = labels[is_history & (labels != -1)]
    if (labels < -1).any() or (shared >= next_label).any():
        raise ValueError(f"{where}: 'labels' must be -1 or in [0, next_label={next_label}) ({CONFIG_FILE}).")
    if np.unique(shared).size != shared.size:
        raise ValueError(f"{where}: 'labels' repeat; each shared record has its own label.")
    sharing = config.get("sharing", {})
    per_user: dict[str, int] = {}
    per_buffer: dict[str, int] = {}
    for (record, _), label, in_history in zip(lines, labels.tolist(), is_history.tolist(), strict=True):
        if not in_history:
            per_buffer[record.user_id] = per_buffer.get(record.user_id, 0) + 1
            continue
        per_user[record.user_id] = per_user.get(record.user_id, 0) + 1
        if label != -1 and not sharing.get(record.user_id, share_by_default):
            raise ValueError(
                f"{where}: record {record.id!r} of user {record.user_id!r}, who does not share, has a global label."
            )
    if capacity is not None:
        over = next((u for u, n in per_user.items() if n > capacity), None)
        if over is not None:
            raise ValueError(
                f"{RECORDS_FILE} in {directory}: user {over!r} has {per_user[over]} history records, over the "
                f"`capacity` of {capacity} ({CONFIG_FILE})."
            )
    over = next((u for u, n in per_buffer.items() if buffer_size is not None and n > buffer_size), None)
    if over is not None:
        raise ValueError(
            f"{RECORDS_FILE} in {directory}: user {over!r} has {per_buffer[over]} buffer records, over the "
            f"`buffer_size` of {buffer_size} ({CONFIG_FILE})."
        )
    counts = config.get("counts", {})
    found = {"records": len(history), "buffer_records": len(lines) - len(history), "shared_records": shared.size}
    wrong = next((key for key, n in found.items() if counts.get(key, n) != n), None)
    if wrong is not None:
        raise ValueError(
            f"{CONFIG_FILE} in {directory}: field 'counts.{wrong}' is {counts[wrong]}, but {RECORDS_FILE} and "
            f"{EMBEDDINGS_FILE} hold {found[wrong]}."
        )
    if not np.isfinite(tensors.get("gate_observed", np.empty(0))).all():
        raise ValueError(f"{where}: 'gate_observed' must be finite scores.")
    centroids = tensors.get("community_centroids", np.empty((0, dim)))
    if not np.isfinite(centroids).all():
        raise ValueError(f"{where}: 'community_centroids' must be finite vectors.")
    sizes = (config.get("communities") or {}).get("sizes", [])
    if config.get("communities") and centroids.shape[0] != len(sizes):
        raise ValueError(
            f"{where}: 'community_centroids' holds {centroids.shape[0]} centroids, but {CONFIG_FILE}'s field "
            f"'communities.sizes' has {len(sizes)} communities."
        )


def write_files(directory: Path, config: dict, lines: list[dict], tensors: dict[str, np.ndarray]) -> None:
    """Writes a memory snapshot: `records.jsonl`, `embeddings.safetensors`, then `config.json` (last: a folder with
    a config but missing data files is reported as such on load)."""
    with open(directory / RECORDS_FILE, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    save_file(tensors, str(directory / EMBEDDINGS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def write_backend_files(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes a memory whose records live in an external backend: `embeddings.safetensors` with the small state
    (gate scores and their owners; no embeddings), then `config.json`, whose `backend` field names the store. No
    record, text or vector is written: the folder connects to the store again, never copies it."""
    save_file(tensors, str(directory / EMBEDDINGS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def read_backend_rows(
    local_rows: Iterator[dict],
    global_rows: Iterator[dict],
    *,
    dim: int,
    max_text_chars: int,
    where: str,
    sharing: dict,
    share_by_default: bool,
) -> tuple[list[tuple[Interaction, dict]], dict[str, np.ndarray], int]:
    """A backend's rows as a load's `(lines, tensors, last write seq)`, checked like a folder's files: every record
    validates, matches its row's user and id, and has a finite unit-norm vector of `dim`; global rows must name a
    stored history record of a sharing user, once. Errors name the collection (`where`) and the record."""
    local_rows = sorted(local_rows, key=lambda row: int(row.get("seq", 0)))
    lines, vectors = [], []
    for row in local_rows:
        name = f"{where}_local: record {row.get('record_id')!r} of user {row.get('user_id')!r}"
        try:
            record = Interaction.from_dict(row["record"], max_text_chars=max_text_chars)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from err
        if (record.user_id, record.id) != (row.get("user_id"), row.get("record_id")):
            raise ValueError(f"{name}: the stored record names user {record.user_id!r}, id {record.id!r}.")
        if row.get("region") not in ("history", "buffer"):
            raise ValueError(f"{name}: unknown region {row.get('region')!r}.")
        vector = np.asarray(row.get("vector"), dtype=np.float32)
        if vector.shape != (dim,) or not np.isfinite(vector).all() or abs(float(vector @ vector) - 1.0) > 2e-3:
            raise ValueError(f"{name}: the vector must be {dim} finite numbers of norm 1.")
        line = dict(row["record"], region=row["region"])
        if row.get("score") is not None:
            line["score"] = float(row["score"])
        lines.append((record, line))
        vectors.append(vector)
    history = {(r.user_id, r.id): i for i, (r, line) in enumerate(lines) if line["region"] == "history"}
    labels = np.full(len(lines), -1, dtype=np.int64)
    seen: set[int] = set()
    for row in global_rows:
        key, label = (row.get("user_id"), row.get("record_id")), int(row.get("label", -1))
        position = history.get(key)
        if (position is None or label < 0 or label in seen or labels[position] >= 0
                or not sharing.get(key[0], share_by_default)):  # fmt: skip
            # A shared row without its record (or of a user who opted out, or twice): never served; left to the
            # writer that owns it.
            logger.warning(
                "%s_global: label %s of user %r has no shared history record; ignored", where, label, key[0]
            )
            continue
        labels[position] = label
        seen.add(label)
    tensors = {
        "embeddings": np.stack(vectors) if vectors else np.empty((0, dim), dtype=np.float32),
        "labels": labels,
    }
    last_seq = int(local_rows[-1].get("seq", 0)) if local_rows else 0  # (sorted by seq above)
    return lines, tensors, last_seq


@contextlib.contextmanager
def paused_gc():
    """Pauses the cyclic garbage collector for a bulk load. A load allocates about ten acyclic objects per record,
    and the collector's passes over them cost a quarter of a 100k-record load; reference counting still frees
    everything, and the collector runs again (if it was on) when the load ends or fails."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def ann_data_checksum(vectors: np.ndarray, labels: np.ndarray, params: dict) -> str:
    """What an ANN index was built from: the shared vectors, their labels (in the same order) and the build
    parameters. A cached index is used only when this matches."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    # (hashed through the buffer protocol: `tobytes` would copy 150 MiB at 100k records)
    digest.update(memoryview(np.ascontiguousarray(labels, dtype=np.int64)).cast("B"))
    digest.update(memoryview(np.ascontiguousarray(vectors, dtype=np.float32)).cast("B"))
    return digest.hexdigest()


def _machine_key() -> bytes | None:
    """This machine's (this user's) secret for the ANN cache, created on first use: `$SPRING_CACHE_HOME` or
    `~/.cache/transformers_spring`, file `ann_cache.key` (mode 0600). None when it cannot be read or created: then
    no cache is written or trusted."""
    home = Path(os.environ.get("SPRING_CACHE_HOME") or Path.home() / ".cache" / "transformers_spring")
    path = home / "ann_cache.key"
    for _ in range(2):
        try:
            key = path.read_bytes()
            if len(key) == 32:
                return key
            return None
        except FileNotFoundError:
            try:
                home.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # another process created it first: read theirs
            except OSError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
        except OSError:
            return None
    return None


def _seal(key: bytes, entry: dict) -> str:
    message = json.dumps([entry["sha256"], entry["data_sha256"], entry["params"], entry["count"]], sort_keys=True)
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


_NO_ANN_CACHE: contextvars.ContextVar[bool] = contextvars.ContextVar("spring_no_ann_cache", default=False)


@contextlib.contextmanager
def no_ann_cache() -> Iterator[None]:
    """Saves inside this block write no ANN cache: every `push_to_hub` saves under it, so an upload never holds the
    machine-local index."""
    token = _NO_ANN_CACHE.set(True)
    try:
        yield
    finally:
        _NO_ANN_CACHE.reset(token)


def save_ann_index(directory: Path, index: Any) -> bool:
    """Dumps a live hnswlib index into a save's staging folder (under the memory's lock: the index must match the
    snapshot); False, writing nothing, inside [`no_ann_cache`] or when this machine has no cache key."""
    if _NO_ANN_CACHE.get() or _machine_key() is None:
        return False
    index.save_index(str(directory / ANN_INDEX_FILE))
    return True


def ann_index_entry(directory: Path, vectors: np.ndarray, labels: np.ndarray, params: dict) -> dict:
    """The `config.json` entry that vouches for a dumped index (computed outside the lock): the file's sha256, the
    checksum of the shared embeddings and labels it was built from, the build parameters and an HMAC of all of them
    under this machine's key, so that a folder written elsewhere (a clone of someone's repo) never has its index
    loaded."""
    entry = {
        "file": ANN_INDEX_FILE,
        "sha256": _sha256_file(directory / ANN_INDEX_FILE),
        "data_sha256": ann_data_checksum(vectors, labels, params),
        "params": params,
        "count": int(labels.shape[0]),
    }
    entry["hmac"] = _seal(_machine_key(), entry)
    return entry


def _index_size_limit(count: int, params: dict) -> int:
    """A generous bound on an hnswlib file's size (vectors, level-0 links, upper levels, headers)."""
    return 4 * count * (4 * params["dim"] + 16 * params["M"] + 64) + 2**20


def read_ann_index(directory: Path, entry: Any, vectors: np.ndarray, labels: np.ndarray, params: dict, *,
                   max_elements: int) -> Any:  # fmt: skip
    """The cached hnswlib index of a memory folder, or None when it must be rebuilt: no cache, a Hub download
    (never loaded from there), a folder written on another machine (the HMAC), other build parameters, other
    embeddings or labels, an oversized file, a file whose checksum does not match `config.json`, or one hnswlib
    cannot load or whose vectors differ from the embeddings. A mismatch is logged, never an error: the index is
    derived data.

    Args:
        directory (`Path`): the memory folder. entry (`dict`): `config.json`'s `ann_index`.
        vectors (`np.ndarray`), labels (`np.ndarray`): the shared embeddings and their labels, in label order.
        params (`dict`): the memory's build parameters ([`GlobalMemory.ann_params`]).
        max_elements (`int`): the capacity to load the index with.
    """
    if entry is None:
        return None
    path = directory / ANN_INDEX_FILE
    if not isinstance(entry, dict) or entry.get("file") != ANN_INDEX_FILE or not isinstance(entry.get("hmac"), str):
        logger.warning(f"{CONFIG_FILE} in {directory}: field 'ann_index' is malformed; rebuilding the index.")
        return None
    if allowed_root(directory.absolute()) != directory.resolve():
        return None  # a Hub cache snapshot: its index is never trusted (and never downloaded)
    if not path.is_file() or path.is_symlink():
        logger.info(f"{ANN_INDEX_FILE} not in {directory}; rebuilding the global index.")
        return None
    if entry.get("params") != params:
        logger.info(f"{ANN_INDEX_FILE} in {directory} was built with other parameters; rebuilding it.")
        return None
    key = _machine_key()
    try:
        sealed = key is not None and hmac.compare_digest(_seal(key, entry), entry["hmac"])
    except (KeyError, TypeError):
        sealed = False
    if not sealed:
        logger.info(f"{ANN_INDEX_FILE} in {directory} was not written on this machine; rebuilding the index.")
        return None
    if entry.get("count") != int(labels.shape[0]) or entry.get("data_sha256") != ann_data_checksum(
        vectors, labels, params
    ):
        logger.warning(f"{ANN_INDEX_FILE} in {directory} does not match {EMBEDDINGS_FILE}; rebuilding the index.")
        return None
    if path.stat().st_size > _index_size_limit(int(labels.shape[0]), params) or entry.get("sha256") != _sha256_file(
        path
    ):
        logger.warning(f"{ANN_INDEX_FILE} in {directory} fails its checksum; rebuilding the index.")
        return None
    import hnswlib

    try:
        index = hnswlib.Index(space=params["space"], dim=params["dim"])
        index.load_index(str(path), max_elements=max(max_elements, int(labels.shape[0])))
        ids = np.asarray(index.get_ids_list(), dtype=np.int64)
        sample = labels[:: max(1, labels.shape[0] // 64)]
        stored = np.asarray(index.get_items(sample.tolist()), dtype=np.float32)
    except (RuntimeError, ValueError, MemoryError, OSError) as err:
        logger.warning(f"{ANN_INDEX_FILE} in {directory} cannot be loaded ({err}); rebuilding the index.")
        return None
    expected = vectors[:: max(1, labels.shape[0] // 64)]
    if ids.shape[0] != labels.shape[0] or not np.array_equal(np.sort(ids), np.sort(labels)):
        logger.warning(f"{ANN_INDEX_FILE} in {directory} holds other labels; rebuilding the index.")
        return None
    if stored.shape != expected.shape or not np.allclose(stored, expected, atol=1e-5):
        logger.warning(f"{ANN_INDEX_FILE} in {directory} holds other vectors; rebuilding the index.")
        return None
    return index


def match_pairs(tensors: dict, lines: list, directory: Path) -> np.ndarray | None:
    """The saved sharing-rule matches as pairs of record positions (rows of `records.jsonl`), checked: positions
    in range, two history records of different users. None for a memory saved without them."""
    pairs = tensors.get("match_pairs")
    if pairs is None:
        return None
    where = f"{EMBEDDINGS_FILE} in {directory}"
    if pairs.dtype.kind not in "iu" or pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{where}: 'match_pairs' must be an integer (n, 2) tensor, got {pairs.dtype} {pairs.shape}.")
    if pairs.size and (pairs.min() < 0 or pairs.max() >= len(lines)):
        raise ValueError(f"{where}: 'match_pairs' indexes outside {RECORDS_FILE} ({len(lines)} records).")
    labels = tensors["labels"]
    for a, b in pairs.tolist():
        if labels[a] < 0 or labels[b] < 0 or lines[a][0].user_id == lines[b][0].user_id:
            raise ValueError(f"{where}: 'match_pairs' row ({a}, {b}) is not two shared records of different users.")
    return pairs.astype(np.int64)
