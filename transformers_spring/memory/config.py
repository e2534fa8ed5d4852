"""[`LoGoMemoryConfig`]: the settings of a [`LoGoMemory`] that its `config.json` saves, declared once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..records import DEFAULT_MAX_TEXT_CHARS
from ..utils.validation import check_bool, check_choice, check_float, check_int
from .global_memory import SCOPES
from .local import SCORERS
from .support import DEFAULT_MATCH_THRESHOLD, DEFAULT_MIN_CONTRIBUTORS, SHARING_POLICIES


@dataclass
class LoGoMemoryConfig:
    """The saved constructor settings of a [`LoGoMemory`]: what `config()` returns (with the encoder's name and
    dimension), what `config.json` holds and what a load passes back to the constructor. Settings that are not saved
    (the encoder object, `mediator`, `backend`, `num_threads`, `device`) are constructor arguments only. The
    components check their own settings again (the gate, the global memory), so a bad value fails here or there with
    the same message.
    """

    scorer: str = field(
        default="dense",
        metadata={"help": "Local scoring: 'dense' (cosine) or 'bm25' (SPRInG's gate); the global path is dense."},
    )
    gate: float | str | None = field(
        default="auto", metadata={"help": "The relevance gate on local hits: a threshold, 'auto' or None (no gate)."}
    )
    gate_quantile: float = field(default=0.75, metadata={"help": "Quantile for gate='auto' (the paper's Q3)."})
    use_global: bool = field(default=True, metadata={"help": "Whether `retrieve` consults the global memory."})
    global_scope: str = field(
        default="own", metadata={"help": "'own' community or 'all' eligible communities for global hits."}
    )
    min_community_users: int = field(default=5, metadata={"help": "Smallest community allowed to feed retrieval."})
    sharing_policy: str = field(
        default="private",
        metadata={"help": "What the global memory serves to other users: 'private' (only items that enough users "
                          "wrote alike, see min_contributors) or 'consented' (the items of users who opted in, "
                          "verbatim)."},
    )  # fmt: skip
    min_contributors: int = field(
        default=DEFAULT_MIN_CONTRIBUTORS,
        metadata={"help": "Distinct users, the author included, that must write alike before an item is served to "
                          "others (1 turns the sharing rule off)."},
    )  # fmt: skip
    match_threshold: float = field(
        default=DEFAULT_MATCH_THRESHOLD, metadata={"help": "Encoder cosine at which two users' items match."}
    )
    max_matches: int = field(default=32, metadata={"help": "Most matches searched per shared item."})
    exact_match_below: int = field(
        default=20_000, metadata={"help": "Shared items up to which matches are searched exactly."}
    )
    n_communities: int | None = field(
        default=None, metadata={"help": "Fixed number of communities (None: chosen by silhouette)."}
    )
    capacity: int | None = field(
        default=10_000, metadata={"help": "Most history records per user (None: unbounded); the oldest are evicted."}
    )
    dedup_threshold: float | None = field(
        default=0.98, metadata={"help": "Cosine at which a write counts as a duplicate (None: no deduplication)."}
    )
    buffer_size: int = field(default=50, metadata={"help": "Most records in a user's pinned buffer."})
    bm25_idf: str = field(default="okapi", metadata={"help": "BM25 idf variant: 'okapi' or 'lucene'."})
    max_text_chars: int = field(
        default=DEFAULT_MAX_TEXT_CHARS, metadata={"help": "Longest accepted prompt, response or query."}
    )
    share_by_default: bool | None = field(
        default=None,
        metadata={"help": "Whether users who never called set_sharing feed the global memory (None: the policy's "
                          "default, True under 'private', False under 'consented', where consent is explicit)."},
    )  # fmt: skip
    hnsw_M: int = field(default=16, metadata={"help": "hnswlib `M` of the global ANN index."})
    hnsw_ef_construction: int = field(default=200, metadata={"help": "hnswlib `ef_construction` of the index."})
    hnsw_ef: int = field(default=64, metadata={"help": "hnswlib `ef` (search breadth) of the index."})
    exact_below: int = field(
        default=2048, metadata={"help": "Global candidate sets up to this size are searched exactly."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for k-means and hnswlib."})

    def __post_init__(self):
        check_choice(self.scorer, "scorer", SCORERS)
        check_choice(self.global_scope, "global_scope", SCOPES)
        check_choice(self.sharing_policy, "sharing_policy", SHARING_POLICIES)
        share = check_bool(self.share_by_default, "share_by_default", optional=True)
        if share and self.sharing_policy == "consented":
            raise ValueError(
                "`share_by_default=True` contradicts `sharing_policy='consented'`: consent is explicit, each user opts in "
                "with set_sharing(user, True)."
            )
        self.share_by_default = self.sharing_policy == "private" if share is None else share
        self.use_global = check_bool(self.use_global, "use_global")
        self.capacity = check_int(self.capacity, "capacity", minimum=1, optional=True)
        check_float(self.dedup_threshold, "dedup_threshold", minimum=-1.0, maximum=1.0, optional=True, hint="a cosine")
        self.buffer_size = check_int(self.buffer_size, "buffer_size", minimum=0)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in declaration order (the keys of `config.json` that go back to the constructor)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def saved(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The settings a saved `config.json` holds (a memory saved before a setting existed gets its default)."""
        return {name: config[name] for name in cls.names() if name in config}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
