"""A [`VectorBackend`] on Milvus through pymilvus's `MilvusClient`: Milvus Lite (embedded, a local file) on one
machine, a Milvus standalone or cluster given a URI and token.

Install with `pip install transformers-spring[milvus]` (pymilvus and milvus-lite).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from ..records import MAX_ID_CHARS, user_bucket
from ..utils.quiet import quiet_milvus_lite
from ..utils.validation import check_choice, check_int
from .backends import SCOPES, BackendError

logger = logging.get_logger(__name__)

REGIONS = ("history", "buffer")
_TOKEN_ENV = "SPRING_MILVUS_TOKEN"
URI_ENV = "SPRING_MILVUS_URI"
SEARCHES = ("process", "milvus")
# Milvus Lite serves gRPC in this process, on loopback: no proxy or NAT to keep a connection alive through. pymilvus
# pings every 10 s, idle or not; Lite's server keeps grpc's default policy (at most one ping per 5 min, or 2 h while
# idle), so after ~2 idle minutes it sends GOAWAY "too_many_pings" and grpc's C core prints an error line. No pings,
# no GOAWAY (INT_MAX is grpc's own "keepalive off").
LITE_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": 0}


def _pymilvus():
    try:
        import pymilvus
    except ImportError as err:  # an optional extra
        raise ImportError(
            "MilvusBackend needs pymilvus (and milvus-lite for a local file): pip install 'transformers-spring[milvus]'"
        ) from err
    return pymilvus


def _literal(value: str) -> str:
    """A Milvus filter-expression string literal (JSON escaping: quotes and backslashes cannot end it early)."""
    return json.dumps(value, ensure_ascii=False)


def local_key(user_id: str, region: str, record_id: str) -> str:
    """The primary key of a local row: fixed length, so no id can collide with another or exceed the field."""
    return hashlib.sha256(json.dumps([user_id, region, record_id]).encode("utf-8")).hexdigest()


def _is_lite(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def uri_hint(uri: str) -> str:
    """A URI as a save may name it in error messages: without credentials or query (a server URI may carry them)."""
    if _is_lite(uri):
        return Path(uri).name  # the file name only: a pushed folder shows no machine-local path
    scheme, _, rest = uri.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1].split("?", 1)[0]
    return f"{scheme}://{host}"


FINGERPRINT_SAMPLE = 64  # saved key hashes that every later state of the store must still hold


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def key_fingerprint(keys) -> dict:
    """How many distinct primary keys a collection holds, a sha256 of them, sorted, and a sample of their hashes (the
    `FINGERPRINT_SAMPLE` smallest): what a save records so that a load recognises the same rows, notices rows that
    went missing or a different store, and still accepts rows written after the save (see
    [`~MilvusBackend.check_saved`])."""
    keys = sorted({str(k) for k in keys})
    digest = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()
    return {"rows": len(keys), "sha256": digest, "sample": sorted(map(_key_hash, keys))[:FINGERPRINT_SAMPLE]}


def _holds_saved_rows(saved: dict, keys) -> bool:
    """Whether a store's keys may be the saved rows plus later writes: at least as many rows, and every sampled
    key hash of the save still there (a fingerprint without a sample cannot tell: False)."""
    sample = saved.get("sample")
    if not isinstance(sample, list):
        return False
    hashes = {_key_hash(str(k)) for k in keys}
    return len(hashes) >= int(saved.get("rows", 0)) and all(isinstance(h, str) and h in hashes for h in sample)


class MilvusBackend:
    """Memory rows in two Milvus collections, `<collection>_local` and `<collection>_global`.

    - **Local rows** sit in `num_buckets` partitions by a stable hash of the user id, so a user's search reads one
      partition (Milvus Lite searches brute force; one partition of 100k rows is ~1.6k rows at 64 buckets). The
      index is `FLAT`: exact, like the in-process default.
    - **Global rows** (shared items) are searched with a filter on the users of the asker's community.
    - **Who answers searches.** With `searches="process"` (the default for a Milvus Lite file) Milvus is the store of
      record and the in-process mirror, which holds every row anyway, answers the dense searches with the default's
      indexes. Milvus Lite brute-forces whatever index is asked for: measured at 100k × 384-d, 66–300 ms a search
      after a flush (0.66–3 µs a row), so a generate call cannot read through it in 10 ms. With `searches="milvus"`
      (the default for a server URI, which builds the HNSW index) the filtered searches go to Milvus.
    - **Writes** are upserts and deletes by key (idempotent), retried with exponential backoff; the collections are
      flushed after each batch of writes so that searches never read unflushed growing segments (measured ~150 ms to
      1 s a search on Milvus Lite, against a few ms after a flush).

    Args:
        uri (`str`): a local file path (Milvus Lite, e.g. `"./memory.db"`) or a server URI
            (`"http://host:19530"`).
        token (`str`, *optional*): the server token (`"user:password"` or an API key); defaults to the
            `SPRING_MILVUS_TOKEN` environment variable. Never written into a save.
        collection (`str`, *optional*, defaults to `"spring_memory"`): the collections' name prefix.
        db_name (`str`, *optional*): the Milvus database (server only).
        num_buckets (`int`, *optional*, defaults to 64): partitions of the local collection.
        global_index (`dict`, *optional*): index parameters of the global collection's vector field; defaults to
            HNSW (M=16, efConstruction=200) when Milvus answers searches and FLAT (no index build) when the process
            does. Milvus Lite searches brute force whatever the index.
        search_ef (`int`, *optional*, defaults to 256): the HNSW beam of a global search (at least 4 × its limit).
        searches (`str`, *optional*): `"process"` (the in-process mirror answers dense searches) or `"milvus"`
            (Milvus answers them); defaults to `"process"` for a Milvus Lite file and `"milvus"` for a server URI.
        check_fingerprint (`bool`, *optional*, defaults to `True`): when this backend loads a saved memory, refuse a
            store whose rows are not the ones the save recorded. `False` loads what the store holds now (rows written
            after the save, or damage: the caller's decision, which a saved folder cannot make).
        timeout (`float`, *optional*, defaults to 10): seconds per call.
        retries (`int`, *optional*, defaults to 4): retries of a failed call, with backoff doubling from `backoff`.
        backoff (`float`, *optional*, defaults to 0.2): the first retry delay, in seconds.
    """

    def __init__(
        self,
        uri: str,
        *,
        token: str | None = None,
        collection: str = "spring_memory",
        db_name: str | None = None,
        num_buckets: int = 64,
        global_index: dict | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.2,
        search_ef: int = 256,
        searches: str | None = None,
        check_fingerprint: bool = True,
    ):
        if not isinstance(uri, (str, os.PathLike)) or not str(uri):
            raise ValueError(f"`uri` must be a file path or a Milvus server URI, got {uri!r}.")
        uri = str(uri)
        lite = _is_lite(uri)
        # Kept for a load, which refuses it: a relative path names whatever store sits in the working directory.
        if lite:
            uri = str(Path(uri).absolute())  # a Milvus Lite file: absolute, so a save names it from anywhere
        if searches is None:
            searches = "process" if lite else "milvus"
        check_choice(searches, "searches", SEARCHES)
        if not isinstance(collection, str) or not collection.replace("_", "a").isalnum() or collection[0].isdigit():
            raise ValueError(f"`collection` must be letters, digits and '_' (not first a digit), got {collection!r}.")
        num_buckets = check_int(num_buckets, "num_buckets", minimum=1, maximum=1024)
        retries = check_int(retries, "retries", minimum=0)
        self.uri = uri
        self.collection = collection
        self.db_name = db_name
        self.num_buckets = num_buckets
        if global_index is None:  # nothing searches Milvus in "process" mode: an HNSW build there only costs CPU
            hnsw = {"index_type": "HNSW", "params": {"M": 16, "efConstruction": 200}}
            global_index = hnsw if searches == "milvus" else {"index_type": "FLAT", "params": {}}
        self.global_index = global_index
        search_ef = check_int(search_ef, "search_ef", minimum=1)
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.search_ef = search_ef
        self._searches = searches
        self._token = token if token is not None else os.environ.get(_TOKEN_ENV)
        self._client = None
        self._dim: int | None = None
        self._dirty: set[str] = set()
        self._lite = lite
        self.check_fingerprint = bool(check_fingerprint)
        self._create = True  # False while a load opens the store: it never creates what a save should hold
        if lite:
            quiet_milvus_lite()  # Lite's log lines that carry no action (docs/memory.md, "What we silence, and why")

    @property
    def searches(self) -> str:
        """Who answers the dense searches: `"process"` or `"milvus"` (fixed at construction: a memory builds or skips
        its in-process index by it)."""
        return self._searches

    @property
    def serves_searches(self) -> bool:
        return self._searches == "milvus"

    def __repr__(self) -> str:
        return f"MilvusBackend(uri={self.uri!r}, collection={self.collection!r})"

    # ------------------------------------------------------------------ plumbing
    def name(self, scope: str) -> str:
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        return f"{self.collection}_{scope}"

    def _call(self, what: str, scope: str | None, fn, *args, retry: bool = True, **kwargs):
        """One client call, retried with exponential backoff (unless `retry=False`: a call that is not idempotent);
        the last failure becomes a [`BackendError`] naming the server, the collection and the operation."""
        delay = self.backoff
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except (ValueError, TypeError):
                raise  # a malformed call: retrying cannot help
            except Exception as err:  # pymilvus raises MilvusException and grpc errors for network faults
                if attempt == attempts - 1:
                    where = f"collection {self.name(scope)!r}" if scope else "the server"
                    raise BackendError(
                        f"Milvus at {self.uri!r}: {what} on {where} failed after {attempt + 1} attempt(s): {err}"
                    ) from err
                logger.warning("Milvus %s failed (%s); retrying in %.2f s", what, err, delay)
                time.sleep(delay)
                delay *= 2

    @property
    def client(self):
        if self._client is None:
            cls = _pymilvus().MilvusClient
            kwargs = {"uri": self.uri, "timeout": self.timeout}
            if self._token:
                kwargs["token"] = self._token
            if self.db_name:
                kwargs["db_name"] = self.db_name
            if self._lite:
                kwargs["grpc_options"] = dict(LITE_GRPC_OPTIONS)
            self._client = self._call("connect", None, cls, **kwargs)
        return self._client

    def connect(self, dim: int) -> None:
        pymilvus = _pymilvus()
        DataType = pymilvus.DataType  # noqa: N806 (pymilvus's enum)

        self._dim = int(dim)
        create, self._create = self._create, True  # a load's refusal to create holds for its own connect only
        client = self.client
        for scope in SCOPES:
            name = self.name(scope)
            if self._call("has_collection", scope, client.has_collection, name):
                self._check_dim(scope)
                if scope == "global":
                    self._adopt_global_index()
                self._call("load_collection", scope, client.load_collection, name)
                continue
            if not create:
                raise ValueError(
                    f"Milvus at {self.uri!r} has no collection {name!r}, which the saved memory's rows are in (a "
                    "deleted collection, or another store): a load never creates it."
                )
            schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            if scope == "local":
                schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
                schema.add_field("region", DataType.VARCHAR, max_length=16)
                schema.add_field("seq", DataType.INT64)
                schema.add_field("score", DataType.DOUBLE)
                schema.add_field("has_score", DataType.BOOL)
                schema.add_field("record", DataType.JSON)
            else:
                schema.add_field("label", DataType.INT64, is_primary=True)
            schema.add_field("user_id", DataType.VARCHAR, max_length=4 * MAX_ID_CHARS)
            schema.add_field("record_id", DataType.VARCHAR, max_length=4 * MAX_ID_CHARS)
            schema.add_field("timestamp", DataType.DOUBLE)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._dim)
            index = client.prepare_index_params()
            spec = {"index_type": "FLAT", "params": {}} if scope == "local" else self.global_index
            index.add_index(field_name="vector", metric_type="IP", **spec)
            self._call("create_collection", scope, client.create_collection, name, schema=schema, index_params=index)
            if scope == "local":
                for bucket in range(self.num_buckets):
                    self._call("create_partition", scope, client.create_partition, name, f"b{bucket}")
            self._call("load_collection", scope, client.load_collection, name)

    def _check_dim(self, scope: str) -> None:
        info = self._call("describe_collection", scope, self.client.describe_collection, self.name(scope))
        for field in info.get("fields", []):
            if field.get("name") == "vector":
                dim = int(field.get("params", {}).get("dim", -1))
                if dim != self._dim:
                    raise ValueError(
                        f"Milvus collection {self.name(scope)!r} at {self.uri!r} holds {dim}-d vectors; this memory's "
                        f"encoder makes {self._dim}-d vectors."
                    )
        if scope == "local":
            partitions = self._call("list_partitions", scope, self.client.list_partitions, self.name(scope))
            if sum(1 for p in partitions if p.startswith("b")) != self.num_buckets:
                raise ValueError(
                    f"Milvus collection {self.name(scope)!r} at {self.uri!r} was created with another `num_buckets` "
                    f"than {self.num_buckets}."
                )

    def _adopt_global_index(self) -> None:
        # The index type stays with the collection: one created in "process" mode (FLAT) and reopened to answer
        # searches brute-forces them, and an HNSW search parameter would be wrong for it. Search by what is there.
        name = self.name("global")
        try:  # an index created without a name is named after its field
            found = (self._call("describe_index", "global", self.client.describe_index, name, "vector") or {}).get(
                "index_type"
            )
        except BackendError:
            return  # a server without the call: keep the declared index
        if found and found != self.global_index.get("index_type"):
            if self.serves_searches:
                logger.warning(
                    "Milvus collection %r at %r has a %s vector index, not the declared %s; searches use it as it is.",
                    name, self.uri, found, self.global_index.get("index_type"),
                )  # fmt: skip
            self.global_index = {"index_type": found, "params": {}}  # its build parameters are the collection's

    # ---------------------------------------------------------------------- writes
    def upsert(self, scope: str, rows: Sequence[dict]) -> None:
        name = self.name(scope)
        if scope == "global":
            data = [
                {"label": int(r["label"]), "user_id": r["user_id"], "record_id": r["record_id"],
                 "timestamp": float(r["timestamp"]), "vector": np.asarray(r["vector"], dtype=np.float32)}
                for r in rows
            ]  # fmt: skip
            for start in range(0, len(data), 2000):
                self._call("upsert", scope, self.client.upsert, name, data[start : start + 2000])
        else:
            by_bucket: dict[int, list[dict]] = {}
            for r in rows:
                by_bucket.setdefault(user_bucket(r["user_id"], self.num_buckets), []).append(
                    {"key": local_key(r["user_id"], r["region"], r["record_id"]), "user_id": r["user_id"],
                     "region": r["region"], "record_id": r["record_id"], "timestamp": float(r["timestamp"]),
                     "seq": int(r["seq"]), "score": 0.0 if r.get("score") is None else float(r["score"]),
                     "has_score": r.get("score") is not None, "record": r["record"],
                     "vector": np.asarray(r["vector"], dtype=np.float32)}
                )  # fmt: skip
            for bucket, data in by_bucket.items():
                for start in range(0, len(data), 2000):
                    self._call(
                        "upsert", scope, self.client.upsert, name, data[start : start + 2000],
                        partition_name=f"b{bucket}",
                    )  # fmt: skip
        self._dirty.add(scope)

    def delete(self, scope: str, keys: Sequence[Any]) -> None:
        if scope == "global":
            ids = [int(k) for k in keys]
        else:
            ids = [local_key(*k) for k in keys]
        for start in range(0, len(ids), 2000):
            self._call("delete", scope, self.client.delete, self.name(scope), ids=ids[start : start + 2000])
        self._dirty.add(scope)

    def delete_user(self, scope: str, user_id: str) -> int:
        before = self.count(scope, user_id)
        self._call("delete", scope, self.client.delete, self.name(scope), filter=f"user_id == {_literal(user_id)}")
        self._dirty.add(scope)
        self.flush()
        left = self.count(scope, user_id)
        if left:
            raise BackendError(
                f"Milvus at {self.uri!r}: {left} row(s) of user {user_id!r} are still in {self.name(scope)!r} after "
                "the delete."
            )
        return before

    def flush(self) -> None:
        for scope in sorted(self._dirty):
            self._call("flush", scope, self.client.flush, self.name(scope))
        self._dirty.clear()

    # ----------------------------------------------------------------------- reads
    def _filter(self, users, exclude_users, region, before) -> str:
        terms = []
        for names, equal, member in ((users, "==", "in"), (exclude_users, "!=", "not in")):
            names = list(names) if names is not None else None
            if names is None or (equal == "!=" and not names):
                continue
            if len(names) == 1:
                terms.append(f"user_id {equal} {_literal(names[0])}")
            else:
                terms.append(f"user_id {member} [{', '.join(_literal(u) for u in names)}]")
        if region is not None:
            terms.append(f"region == {_literal(region)}")
        if before is not None:
            terms.append(f"timestamp < {float(before)!r}")
        return " and ".join(terms)

    def search(
        self,
        scope: str,
        query: np.ndarray,
        k: int,
        *,
        users: Sequence[str] | None = None,
        exclude_users: Sequence[str] | None = None,
        region: str | None = None,
        before: float | None = None,
    ) -> list[tuple[Any, float]]:
        if users is not None and not len(users):
            return []
        k = int(min(k, 16384))  # Milvus's topk limit
        kwargs: dict[str, Any] = {"limit": k, "output_fields": ["record_id" if scope == "local" else "label"]}
        expression = self._filter(users, exclude_users, region if scope == "local" else None, before)
        if expression:
            kwargs["filter"] = expression
        if scope == "local" and users is not None and len(users) == 1:
            kwargs["partition_names"] = [f"b{user_bucket(users[0], self.num_buckets)}"]
        if scope == "global" and self.global_index.get("index_type") == "HNSW":
            # A filtered HNSW search must visit many rows to find `limit` that pass the filter: a narrow beam (ef
            # near `limit`) misses true neighbours.
            kwargs["search_params"] = {"params": {"ef": max(self.search_ef, 4 * k)}}
        query = np.asarray(query, dtype=np.float32)
        result = self._call("search", scope, self.client.search, self.name(scope), data=[query], **kwargs)
        field = "record_id" if scope == "local" else "label"
        hits = []
        for hit in result[0]:
            entity = hit.get("entity", hit)
            key = entity.get(field, hit.get("id")) if field != "label" else hit.get("id", entity.get("label"))
            hits.append((key if scope == "local" else int(key), float(hit.get("distance", 0.0))))
        return hits

    def count(self, scope: str, user_id: str | None = None) -> int:
        kwargs: dict[str, Any] = {"output_fields": ["count(*)"]}
        if user_id is not None:
            kwargs["filter"] = f"user_id == {_literal(user_id)}"
            if scope == "local":
                kwargs["partition_names"] = [f"b{user_bucket(user_id, self.num_buckets)}"]
        result = self._call("count", scope, self.client.query, self.name(scope), **kwargs)
        return int(result[0]["count(*)"]) if result else 0

    def rows(self, scope: str) -> Iterator[dict]:
        """Every row of `scope`, one per primary key. A crash can leave two rows with one key; the newest (by the
        memory's write order, `seq`, for local rows; the later timestamp for global ones) is kept, written back so
        that the store holds it once, and the repair is logged."""
        kept: dict[Any, dict] = {}
        repaired: set[Any] = set()
        fields = (
            ["key", "user_id", "region", "record_id", "timestamp", "seq", "score", "has_score", "record", "vector"]
            if scope == "local"
            else ["label", "user_id", "record_id", "timestamp", "vector"]
        )
        for row in self._stored_rows(scope, fields):
            if scope == "local":
                row["score"] = row["score"] if row.pop("has_score") else None
            key = row["key"] if scope == "local" else int(row["label"])
            old = kept.get(key)
            if old is not None:
                order = "seq" if scope == "local" else "timestamp"
                repaired.add(key)
                if float(row.get(order, 0)) < float(old.get(order, 0)):
                    continue
            kept[key] = row
        if repaired:
            logger.warning(
                "Milvus collection %r at %r held %d primary key(s) twice (a crashed write); kept the newest row of "
                "each and wrote it back: %s", self.name(scope), self.uri, len(repaired), sorted(map(str, repaired))[:5],
            )  # fmt: skip
            # An upsert replaces every stored row with its key: the store then holds the kept one once.
            self.upsert(scope, [dict(kept[key]) for key in repaired])
            self.flush()
        yield from kept.values()

    def _stored_rows(self, scope: str, fields: list[str]) -> Iterator[dict]:
        """The `fields` of every stored row of `scope`, as Milvus returns them (a crash's duplicates included)."""
        iterator = self._call(
            "query_iterator", scope, self.client.query_iterator, self.name(scope), batch_size=4096, filter="",
            output_fields=fields,
        )  # fmt: skip
        try:
            while True:
                # Not retried: a retried `next` could skip the batch that failed, and a load would miss its rows.
                batch = self._call("query_iterator", scope, iterator.next, retry=False)
                if not batch:
                    return
                yield from batch
        finally:
            iterator.close()

    def drop(self) -> None:
        """Drops both collections (their rows are gone for every process)."""
        for scope in SCOPES:
            if self._call("has_collection", scope, self.client.has_collection, self.name(scope)):
                self._call("drop_collection", scope, self.client.drop_collection, self.name(scope))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------- manifest
    def fingerprint(self) -> dict:
        """Per scope, how many rows the store holds and a digest of their primary keys (see [`key_fingerprint`]),
        read without the vectors."""
        fields = {"local": "key", "global": "label"}
        return {
            scope: key_fingerprint(row[fields[scope]] for row in self._stored_rows(scope, [fields[scope]]))
            for scope in SCOPES
        }

    def manifest(self) -> dict:
        """What a save records: the collections and a fingerprint of their rows. Never where to connect (a load
        connects to the caller's backend or `$SPRING_MILVUS_URI`), nor a secret: `uri_hint` only names the store in
        error messages."""
        return {
            "type": "milvus",
            "uri_hint": uri_hint(self.uri),
            "collection": self.collection,
            "db_name": self.db_name,
            "num_buckets": self.num_buckets,
            "searches": self.searches,
            "collections": {scope: self.name(scope) for scope in SCOPES},
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_manifest(cls, manifest: dict, uri: str | None = None, **kwargs) -> MilvusBackend:
        """The backend of a saved memory on the caller's store: `uri` or, without it, `$SPRING_MILVUS_URI` (a URI a
        manifest names is never connected to: the token would go with it). `token` comes from `kwargs` or the
        environment: a save never holds one."""
        if not isinstance(manifest, dict) or manifest.get("type") != "milvus":
            raise ValueError(f"not a Milvus backend manifest: {manifest!r}.")
        if not isinstance(manifest.get("collection"), str):
            raise ValueError("the Milvus backend manifest is missing the string field 'collection'.")
        uri = uri or os.environ.get(URI_ENV)
        if not uri:
            hint = manifest.get("uri_hint", manifest.get("uri"))
            raise ValueError(
                f"this memory's rows are in the Milvus collections {manifest['collection']!r}_local and _global"
                f"{f' (saved from {hint!r})' if isinstance(hint, str) else ''}; a saved folder never chooses where to "
                f"connect: pass `backend=MilvusBackend(uri, collection={manifest['collection']!r})` to "
                f"from_pretrained, or set ${URI_ENV}."
            )
        settings = {"collection": manifest["collection"], "db_name": manifest.get("db_name")}
        for field in ("num_buckets", "searches"):
            if manifest.get(field) is not None:
                settings[field] = manifest[field]
        settings.update(kwargs)
        return cls(uri, **settings)

    def open_saved(self, manifest: dict, where: str = "the saved memory") -> None:
        """Prepares this backend to load the memory `manifest` describes, before it connects: the collection must be
        the manifest's, a Milvus Lite path absolute and present, and the connect creates nothing.

        Raises:
            `ValueError`: another collection.
            `FileNotFoundError`: the Milvus Lite store does not exist (a load never creates one, whatever the path).
        """
        if manifest.get("collection") != self.collection:
            raise ValueError(
                f"{where} is stored in the Milvus collections {manifest.get('collection')!r}_local and _global, not "
                f"in {self.collection!r}: pass `backend=MilvusBackend(uri, collection={manifest.get('collection')!r})`."
            )
        # The caller's path (made absolute at construction, relative ones from the working directory) must name an
        # existing store: a load never creates one.
        if self._lite and not Path(self.uri).exists():
            raise FileNotFoundError(
                f"the Milvus Lite store {self.uri!r} that {where} needs does not exist (deleted or moved?)."
            )
        self._create = False

    def check_saved(self, manifest: dict, local_rows: Sequence[dict], global_rows: Sequence[dict]) -> None:
        """Compares the rows a load read with the fingerprint `manifest` saved (unless `check_fingerprint=False`).

        Raises:
            `ValueError`: rows are missing (expected against found counts per collection), or they are not the rows
                the save recorded (another store, or writes after the save).
        """
        saved = manifest.get("fingerprint")
        if not self.check_fingerprint:
            return
        if not isinstance(saved, dict):
            logger.warning(
                "The saved memory on %r predates store fingerprints: its rows are loaded unchecked. Save it again.",
                self.name("local"),
            )
            return
        keys = {"local": [r["key"] for r in local_rows], "global": [int(r["label"]) for r in global_rows]}
        found = {scope: key_fingerprint(keys[scope]) for scope in SCOPES}
        for scope in SCOPES:
            want, got = saved.get(scope) or {}, found[scope]
            if {k: want.get(k) for k in ("rows", "sha256")} == {k: got[k] for k in ("rows", "sha256")}:
                continue
            name = f"Milvus collection {self.name(scope)!r} at {self.uri!r}"
            if _holds_saved_rows(want, keys[scope]):  # the saved rows are there, with rows written since
                logger.info(f"{name} holds {got['rows'] - int(want['rows'])} row(s) written after the save.")
                continue
            if got["rows"] < int(want.get("rows", 0)):
                raise ValueError(
                    f"{name} holds {got['rows']} rows where the save recorded {want.get('rows')}: rows are missing "
                    "(a deleted segment, a damaged store manifest, or another store)."
                )
            raise ValueError(
                f"{name} holds {got['rows']} rows that are not the {want.get('rows')} the save recorded: another "
                "store (another tenant?), or rows of the save deleted since. Save the memory again, or pass "
                "`MilvusBackend(..., check_fingerprint=False)` to load what the store holds now."
            )
