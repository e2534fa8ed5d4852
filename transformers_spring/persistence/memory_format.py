"""How a `LoGoMemory` becomes its files and back. The memory hands over and takes back its contents as a
[`MemoryState`] (`LoGoMemory.export_state` / `restore_state`); everything about files lives here and in
[`~persistence.memory_files`] (names, reading, checks): the saved config's fields, the tensors, the ANN cache, the
manifest of an external backend, and the merge of several memories."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..records import Interaction
from ..version import __version__
from .memory_files import (
    CONFIG_FILE,
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    RECORDS_FILE,
    ann_index_entry,
    check_config,
    check_loaded,
    gate_owners,
    match_pairs,
    paused_gc,
    read_ann_index,
    read_backend_rows,
    read_json,
    read_records,
    read_tensors,
    save_ann_index,
    write_backend_files,
    write_files,
)
from .registry import qualified_name


@dataclass
class MemoryState:
    """A memory's contents as plain data: what a save writes and a load restores.

    Args:
        records (`list[Interaction]`): every record, user by user (in the memory's user order), history then buffer,
            each in write order.
        regions (`list[str]`): `"history"` or `"buffer"`, per record.
        scores (`list[float | None]`): a buffer item's score (None: none), per record.
        embeddings (`np.ndarray`): the records' unit-norm vectors, `(len(records), dim)`.
        labels (`np.ndarray`): per record, the global label of a shared history record, else -1.
        sharing (`dict[str, bool]`): the users' sharing flags.
        next_label (`int`): the next global label to hand out.
        gate_observed (`np.ndarray`): the relevance gate's observed scores.
        gate_owners (`list[str | None]`, *optional*): whose query each score came from (None: unknown).
        counts (`dict[str, int]`, *optional*): users, records, buffer and shared records (for the card).
        community (`dict`, *optional*): [`GlobalMemory.community_state`] (None: clustered afresh).
        match_pairs (`np.ndarray`, *optional*): the sharing rule's matches as `(n, 2)` record positions (None:
            searched afresh).
        write_seq (`int`, *optional*, defaults to 0): the write order of the last backend row.
    """

    records: list[Interaction]
    regions: list[str]
    scores: list[float | None]
    embeddings: np.ndarray
    labels: np.ndarray
    sharing: dict[str, bool]
    next_label: int
    gate_observed: np.ndarray
    gate_owners: list[str | None] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    community: dict | None = None
    match_pairs: np.ndarray | None = None
    write_seq: int = 0

    def shared_rows(self) -> np.ndarray:
        """The positions of the shared records, in label order (what the global index is built from)."""
        rows = np.flatnonzero(self.labels >= 0)
        return rows[np.argsort(self.labels[rows], kind="stable")]


# ------------------------------------------------------------------------------------------------------------ save
def save_memory(memory: Any, directory: Path) -> dict[str, int]:
    """Writes `memory` into `directory` (a save's staging folder): its records, or the manifest of the external
    backend that holds them. Returns the saved counts (for the model card)."""
    if memory.backend is not None:  # every queued write confirmed first, else BackendError and nothing is written
        state = memory.export_state(records=False)
        config = _saved_config(memory, state)
        config["backend"] = memory.backend.manifest()
        write_backend_files(directory, config, _saved_tensors(state, config))
        return config["counts"]
    cached = []

    def cache_index(index: Any) -> None:  # under the memory's lock, so the dump matches the state
        cached.append(save_ann_index(directory, index))

    state = memory.export_state(cache_index=cache_index)
    config = _saved_config(memory, state)
    if any(cached):  # the checksums, outside the lock: writers need not wait for them
        rows = state.shared_rows()
        config["ann_index"] = ann_index_entry(
            directory, state.embeddings[rows], state.labels[rows], memory.global_memory.ann_params()
        )
    lines = []
    for record, region, score in zip(state.records, state.regions, state.scores, strict=True):
        line = dict(record.to_dict(), region=region)
        if score is not None:
            line["score"] = score
        lines.append(line)
    write_files(directory, config, lines, _saved_tensors(state, config))
    return config["counts"]


def _saved_config(memory: Any, state: MemoryState) -> dict:
    """`config.json`: the format, the settings, the mediator, counts, sharing flags, labels and whose query each gate
    score came from (`gate_users`; only users the memory still knows are named)."""
    config = {
        "format_version": FORMAT_VERSION,
        "library": "transformers_spring",
        "library_version": __version__,
        **memory.config(),
        "mediator": {"class": qualified_name(type(memory.mediator)), **memory.mediator.config()},
        "counts": state.counts,
        "sharing": state.sharing,
        "next_label": state.next_label,
        "gate_users": sorted({o for o in state.gate_owners or () if o is not None}),
        "saved_at": time.time(),
    }
    if state.community is not None:
        config["communities"] = {k: v for k, v in state.community.items() if k != "centroids"}
    return config


def _saved_tensors(state: MemoryState, config: dict) -> dict[str, np.ndarray]:
    """`embeddings.safetensors`: the vectors and labels, the gate's scores with their owners as indices into
    `gate_users` (-1: unknown), the matches and the community centroids (when the state has them)."""
    position = {user: i for i, user in enumerate(config["gate_users"])}
    tensors = {
        "embeddings": state.embeddings,
        "labels": state.labels,
        "gate_observed": state.gate_observed,
        "gate_owner": np.asarray([position.get(o, -1) for o in state.gate_owners or ()], dtype=np.int64),
    }
    if state.match_pairs is not None:
        tensors["match_pairs"] = state.match_pairs
    if state.community is not None:
        tensors["community_centroids"] = state.community["centroids"]
    return tensors


# ------------------------------------------------------------------------------------------------------------ load
def load_memory(cls: type, directory: Path, *, encoder: Any = None, backend: Any = None, **kwargs) -> Any:
    """A `cls` (a `LoGoMemory` class) loaded from `directory`: its records, or the rows of the caller's `backend` that
    its manifest fingerprints. Nothing is unpickled or executed, and every file is checked before anything is restored.

    Args:
        cls (`type`): the memory class to build.
        directory (`Path`): the memory folder.
        encoder (*optional*): required when the memory was saved with a custom encoder.
        backend ([`VectorBackend`], *optional*): the store of a memory saved on a backend (a folder never names
            where to connect; without it, a Milvus memory connects to `$SPRING_MILVUS_URI` or raises).
        kwargs: constructor arguments that override the saved ones.
    """
    config = read_json(directory / CONFIG_FILE)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{CONFIG_FILE} in {directory} has format_version {version!r}; this transformers_spring "
            f"({__version__}) reads format_version {FORMAT_VERSION}."
        )
    for key in ("dim", "encoder", "next_label"):
        if key not in config:
            raise ValueError(f"{CONFIG_FILE} in {directory} is missing the field {key!r}.")
    check_config(config, directory / CONFIG_FILE)
    saved_encoder = config["encoder"]
    if encoder is None:
        if not isinstance(saved_encoder, str) or saved_encoder.startswith(("callable:", "sentence-transformers:")):
            raise ValueError(
                f"{CONFIG_FILE} records the custom encoder {saved_encoder!r}; pass the same one as `encoder=`."
            )
        encoder = saved_encoder
    saved_policy = config.get("sharing_policy", "private")  # (saves from before the policy existed ran "private")
    if "sharing_policy" in kwargs and kwargs["sharing_policy"] != saved_policy:
        # The saved flags mean what the saved policy says: under another one they would silently grant or drop
        # consent. A change is explicit, on the loaded memory.
        raise ValueError(
            f"{CONFIG_FILE} in {directory} was saved with sharing_policy={saved_policy!r}; load it as saved and "
            f"call memory.set_sharing_policy({kwargs['sharing_policy']!r})."
        )
    settings = {**cls.config_class.saved(config), **kwargs}
    if "mediator" not in kwargs:
        settings["mediator"] = _saved_mediator(config, directory)
    try:
        memory = cls(encoder, **settings)
    except (TypeError, ValueError, OverflowError) as err:
        if kwargs:  # (the caller's own arguments may be what is refused: their error stands)
            raise
        raise ValueError(f"{CONFIG_FILE} in {directory} holds a setting the memory refuses: {err}") from err
    if memory.dim != config["dim"]:
        raise ValueError(
            f"embedding dim mismatch: {CONFIG_FILE} in {directory} says dim={config['dim']}, but the encoder "
            f"{memory.encoder.name!r} produces dim={memory.dim}."
        )
    tensors = read_tensors(directory, config["dim"])
    with paused_gc():
        if config.get("backend") is not None:
            _connect_saved_backend(memory, config, tensors, directory, backend)
        elif backend is not None:
            raise ValueError(
                f"{CONFIG_FILE} in {directory} names no backend: this memory's records are in the folder."
            )
        else:
            _load_folder_records(memory, config, tensors, directory)
    return memory


def _saved_mediator(config: dict, directory: Path) -> Any:
    """The saved mediator, built with its saved class (a subclass survives), or None (the default) when none."""
    saved = config.get("mediator", {})
    if not isinstance(saved, dict):
        raise ValueError(f"{CONFIG_FILE} in {directory}: field 'mediator' must be an object.")
    if not saved:
        return None
    from ..memory.mediator import MEDIATORS  # (the memory package imports this module)

    try:
        return MEDIATORS.resolve(str(saved.get("class", "Mediator")))(
            **{k: v for k, v in saved.items() if k != "class"}
        )
    except (TypeError, ValueError) as err:  # (an unknown class, an unknown or out-of-range setting)
        raise ValueError(f"{CONFIG_FILE} in {directory}: field 'mediator' does not fit its class: {err}") from err


def _saved_share_default(config: dict) -> bool:
    """Whether a user without a saved choice shared when the memory was saved: the rows a load accepts in the global
    memory. Under "consented" only an explicit opt-in counts, whatever the file's `share_by_default` says."""
    if config.get("sharing_policy", "private") == "consented":
        return False
    return bool(config.get("share_by_default", True))


def _load_folder_records(memory: Any, config: dict, tensors: dict, directory: Path) -> None:
    """Fills a fresh memory from `directory`'s records, once they pass every check."""
    settings, counts = memory.settings, config.get("counts", {})
    expected = tensors["embeddings"].shape[0]
    # The config and the embeddings must agree on the count before records.jsonl is streamed against it.
    if "records" in counts and counts["records"] + counts.get("buffer_records", 0) != expected:
        raise ValueError(
            f"{CONFIG_FILE} in {directory}: field 'counts' says {counts['records']} records and "
            f"{counts.get('buffer_records', 0)} buffer records, but {EMBEDDINGS_FILE} holds {expected} embeddings."
        )
    lines = read_records(directory, settings.max_text_chars, expected, counts.get("users"))
    check_loaded(
        config, lines, tensors, directory, dim=memory.dim,
        capacity=config.get("capacity") if "capacity" in config else settings.capacity,
        share_by_default=_saved_share_default(config),  # as saved, not as overridden
        buffer_size=config.get("buffer_size", settings.buffer_size),
    )  # fmt: skip
    match_pairs(tensors, lines, directory)  # refuses malformed saved matches before anything is restored
    _restore(memory, config, lines, tensors, directory)


def _connect_saved_backend(memory: Any, config: dict, tensors: dict, directory: Path, backend: Any) -> None:
    """Loads a memory saved on an external backend: connects to the caller's store (`backend`, or one built from the
    caller's environment: never a URI the folder names, which would receive the caller's token), checks it holds the
    rows the save recorded, and restores every record from there, keeping the global labels (other processes may
    use the same store)."""
    manifest = config["backend"]
    if not isinstance(manifest, dict):
        raise ValueError(f"{CONFIG_FILE} in {directory}: field 'backend' must be an object.")
    if backend is None:
        if manifest.get("type") != "milvus":
            raise ValueError(f"{CONFIG_FILE} in {directory}: field 'backend' names no known backend: {manifest!r}.")
        from ..memory.milvus import MilvusBackend  # (an optional dependency)

        backend = MilvusBackend.from_manifest(manifest)  # `$SPRING_MILVUS_URI`, else an error asking for `backend=`
    # A backend that can check a save (MilvusBackend) refuses another collection or a missing store before it
    # connects, and the rows it reads against the save's fingerprint.
    if hasattr(backend, "open_saved"):
        backend.open_saved(manifest, where=f"the memory in {directory}")
    memory.attach_backend(backend, fresh=False)
    local_rows, global_rows = list(backend.rows("local")), list(backend.rows("global"))
    if hasattr(backend, "check_saved"):
        backend.check_saved(manifest, local_rows, global_rows)
    sharing = {u: bool(s) for u, s in config.get("sharing", {}).items()}
    lines, rows, last_seq = read_backend_rows(
        local_rows, global_rows, dim=memory.dim, max_text_chars=memory.settings.max_text_chars,
        where=f"{backend!r}", sharing=sharing, share_by_default=_saved_share_default(config),
    )  # fmt: skip
    labels = rows["labels"]
    config = dict(config, next_label=max(int(config["next_label"]), int(labels.max(initial=-1)) + 1))
    config.pop("communities", None)  # other writers may have changed them: clustered afresh at the next search
    observed = tensors.get("gate_observed", np.empty(0))
    rows.update({key: tensors[key] for key in ("gate_observed", "gate_owner") if key in tensors})
    if observed.ndim != 1 or not np.isfinite(observed).all():
        raise ValueError(f"{EMBEDDINGS_FILE} in {directory}: 'gate_observed' must be finite scores.")
    _restore(memory, config, lines, rows, write_seq=last_seq)


def _restore(
    memory: Any,
    config: dict,
    lines: list[tuple[Interaction, dict]],
    tensors: dict[str, np.ndarray],
    directory: Path | None = None,
    write_seq: int = 0,
) -> None:
    """Hands loaded files to the memory as a [`MemoryState`], with the global index from `directory`'s ANN cache
    when it is valid (else the memory rebuilds it)."""
    seen = set()
    for record, line in lines:
        key = (record.user_id, record.id)
        if line.get("region", "history") == "history":
            if key in seen:
                raise ValueError(f"{RECORDS_FILE}: id {record.id!r} repeats for user {record.user_id!r}.")
            seen.add(key)
    observed = tensors.get("gate_observed", np.empty(0))
    state = MemoryState(
        records=[record for record, _ in lines],
        regions=[line.get("region", "history") for _, line in lines],
        scores=[line.get("score") for _, line in lines],
        embeddings=tensors["embeddings"],
        labels=tensors["labels"],
        sharing={u: bool(s) for u, s in config.get("sharing", {}).items()},
        next_label=config["next_label"],
        gate_observed=observed,
        gate_owners=gate_owners(config, tensors, len(observed)),
        write_seq=write_seq,
    )
    gm = memory.global_memory
    # Saved matches (checked by `match_pairs` on load) are reused under the same threshold; a changed one searches
    # afresh.
    if float(config.get("match_threshold", gm.match_threshold)) == gm.match_threshold:
        state.match_pairs = tensors.get("match_pairs")
    if config.get("communities"):
        centroids = tensors.get("community_centroids", np.empty((0, memory.dim)))
        state.community = dict(config["communities"], centroids=centroids)
    rows, index = state.shared_rows(), None
    # The cache keeps the saved labels: reused only while they are dense enough, so that label-indexed arrays stay
    # bounded by the live items (a rebuild renumbers them densely).
    if len(rows) and directory is not None and config["next_label"] <= 2 * len(rows) + 1024:
        index = read_ann_index(
            directory, config.get("ann_index"), state.embeddings[rows], state.labels[rows],
            gm.ann_params(), max_elements=2 * len(rows),
        )  # fmt: skip
    memory.restore_state(state, index=index)


# ----------------------------------------------------------------------------------------------------------- merge
def merge_memories(cls: type, memories: Sequence[Any]) -> Any:
    """One `cls` holding the users of several memories with disjoint users, under the first memory's settings and
    encoder (see `LoGoMemory.merge`). Nothing is re-embedded; labels are renumbered, the sharing rule's matches
    searched afresh and communities clustered afresh."""
    first = memories[0]
    settings = first.config()
    states, owner = [], {}
    for i, memory in enumerate(memories):
        different = sorted(k for k, v in memory.config().items() if v != settings.get(k))
        if different:
            raise ValueError(f"memory {i} differs from memory 0 in {different}; merge memories of one setup.")
        state = memory.export_state()  # disjointness is checked on what is merged
        for user in dict.fromkeys(r.user_id for r in state.records):
            if user in owner:
                raise ValueError(f"user {user!r} is in memory {owner[user]} and memory {i}; shards must be disjoint.")
            owner[user] = i
        states.append(state)
    merged = cls(
        first.encoder, mediator=copy.deepcopy(first.mediator), num_threads=first.global_memory.num_threads,
        **first.config_class.saved(settings),
    )  # fmt: skip
    offset, labels = 0, []
    for state in states:  # disjoint label ranges; the restore renumbers them densely
        labels.append(np.where(state.labels >= 0, state.labels + offset, -1))
        offset += state.next_label
    merged.restore_state(
        MemoryState(
            records=[r for s in states for r in s.records],
            regions=[r for s in states for r in s.regions],
            scores=[x for s in states for x in s.scores],
            embeddings=np.concatenate([s.embeddings for s in states]),
            labels=np.concatenate(labels).astype(np.int64),
            sharing={u: share for s in states for u, share in s.sharing.items()},
            next_label=offset,
            gate_observed=np.concatenate([s.gate_observed for s in states]),
            gate_owners=[o for s in states for o in s.gate_owners],
        )  # no matches: searched across memories too; no communities: clustered afresh
    )
    return merged
