"""Memory benchmark: write cost, local search, global search (latency and recall vs exact), save and load.

Run: `python benchmarks/bench_memory.py` (about 3 minutes on 2 CPU cores). Vectors are synthetic, d=384 like
all-MiniLM-L6-v2: users prefer 2-3 of 200 topics, items are noisy topic directions. The encoder is a table look-up so
that the numbers exclude the encoder, as the goals do; `--encoder-check` adds the real MiniLM's cost per text.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from transformers_spring.memory import Interaction, LoGoMemory  # noqa: E402
from transformers_spring.memory.local import LocalMemory  # noqa: E402

DIM = 384


class TableEncoder:
    """Returns precomputed vectors by text: encoding cost ~0, so timings measure the memory itself."""

    name = "benchmark-table"
    dim = DIM

    def __init__(self):
        self.table: dict[str, np.ndarray] = {}

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts])


def synthetic(n_items: int, n_users: int, rng: np.random.Generator, encoder: TableEncoder, noise: float = 0.9):
    topics = rng.normal(size=(200, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    prefs = [rng.choice(200, size=rng.integers(2, 4), replace=False) for _ in range(n_users)]
    records = []
    for i in range(n_items):
        user = int(rng.integers(n_users))
        vec = topics[rng.choice(prefs[user])] + noise * rng.normal(size=DIM).astype(np.float32) / np.sqrt(DIM)
        vec /= np.linalg.norm(vec)
        record = Interaction(f"user{user}", f"item {i}", f"response {i}", timestamp=1.6e9 + i, id=str(i))
        encoder.table[record.text] = vec.astype(np.float32)
        records.append(record)
    return records, topics, prefs


def pct(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def bench_writes(rng) -> None:
    encoder = TableEncoder()
    records, _, _ = synthetic(10_000, 100, rng, encoder)
    memory = LoGoMemory(encoder, gate=None, num_threads=1)
    times = []
    for record in records:
        start = time.perf_counter()
        memory.add(record)
        times.append(time.perf_counter() - start)
    print(
        f"write (add, one record, encoder excluded; 10k records, 100 users, local + global index): "
        f"p50 {pct(times, 50):.3f} ms, mean {np.mean(times) * 1e3:.3f} ms, p99 {pct(times, 99):.3f} ms  "
        f"[goal <= 5 ms]"
    )
    start = time.perf_counter()
    batch = LoGoMemory(encoder, gate=None)
    batch.add_many(records)
    print(
        f"write (add_many, 10k records in one call): {(time.perf_counter() - start) / len(records) * 1e3:.3f} ms/record"
    )


def bench_local(rng) -> None:
    encoder = TableEncoder()
    records, _, _ = synthetic(10_000, 1, rng, encoder)
    local = LocalMemory("user0", DIM, capacity=None, dedup_threshold=None)
    for record in records:
        local.add(record, encoder.table[record.text])
    queries = [encoder.table[records[i].text] for i in rng.choice(len(records), 500)]
    times = []
    for query in queries:
        start = time.perf_counter()
        local.search(query, "", 10)
        times.append(time.perf_counter() - start)
    print(
        f"local search (exact, one user with 10k items, k=10): p50 {pct(times, 50):.3f} ms, "
        f"p99 {pct(times, 99):.3f} ms  [goal p50 <= 0.2 ms]"
    )


def bench_global_and_persistence(rng, n_items: int, n_users: int, num_threads: int = -1) -> None:
    encoder = TableEncoder()
    records, topics, prefs = synthetic(n_items, n_users, rng, encoder)
    # The sharing rule off (min_contributors=1): synthetic items by different users never match at cosine 0.75, so
    # under the rule nothing would be servable and searches would measure an empty answer.
    memory = LoGoMemory(
        encoder, gate=None, dedup_threshold=None, capacity=None, num_threads=num_threads, min_contributors=1
    )
    start = time.perf_counter()
    memory.add_many(records, batch_size=4096)
    build = time.perf_counter() - start
    gm = memory.global_memory
    start = time.perf_counter()
    communities = gm.communities()
    cluster = time.perf_counter() - start
    sizes = sorted((len(m) for m in communities.values()), reverse=True)
    print(
        f"global memory: {len(gm)} items, {n_users} users; add_many + index build {build:.1f} s; "
        f"clustering {cluster:.2f} s -> {len(communities)} communities (users per community {sizes})"
    )
    for scope in ("all", "own"):
        times, recall = [], []
        for _ in range(300):
            user = int(rng.integers(n_users))
            query = topics[rng.choice(prefs[user])] + 0.9 * rng.normal(size=DIM).astype(np.float32) / np.sqrt(DIM)
            query = (query / np.linalg.norm(query)).astype(np.float32)
            start = time.perf_counter()
            hits = gm.search(query, 10, user_id=f"user{user}", scope=scope)
            times.append(time.perf_counter() - start)
            exact_below, gm.exact_below = gm.exact_below, 10**12
            truth = gm.search(query, 10, user_id=f"user{user}", scope=scope)
            gm.exact_below = exact_below
            recall.append(len({h[0] for h in hits} & {t[0] for t in truth}) / max(len(truth), 1))
        print(
            f"global search (scope={scope!r}, k=10, ef={gm.ef}): p50 {pct(times, 50):.3f} ms, "
            f"p99 {pct(times, 99):.3f} ms, recall@10 vs exact {np.mean(recall):.3f}  [goal p50 <= 1 ms, >= 0.95]"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "mem")
        start = time.perf_counter()
        memory.save_pretrained(folder)
        save = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        cache = (
            os.path.getsize(os.path.join(folder, "ann_index.hnsw"))
            if os.path.exists(os.path.join(folder, "ann_index.hnsw"))
            else 0
        )
        start = time.perf_counter()
        loaded = LoGoMemory.from_pretrained(folder, encoder=encoder, num_threads=num_threads)
        load = time.perf_counter() - start
        same = _same_hits(memory, loaded, topics, prefs, rng)
        if cache:
            os.remove(os.path.join(folder, "ann_index.hnsw"))
        start = time.perf_counter()
        rebuilt = LoGoMemory.from_pretrained(folder, encoder=encoder, num_threads=num_threads)
        load_rebuild = time.perf_counter() - start
    assert len(loaded) == len(memory) == len(rebuilt)
    print(
        f"persistence at {len(memory)} records: save {save:.2f} s ({size / 2**20:.0f} MiB, of which the ANN cache "
        f"{cache / 2**20:.0f} MiB); load {load:.2f} s with the cached index (global hits identical to before the "
        f"save: {same}) against {load_rebuild:.2f} s rebuilding it: ratio {load / load_rebuild:.3f}  [goal <= 5 s]"
    )


def _same_hits(memory, loaded, topics, prefs, rng, n: int = 50) -> bool:
    """Whether the loaded memory's global ANN search returns the same records and scores as before the save."""
    for _ in range(n):
        user = int(rng.integers(len(prefs)))
        query = topics[rng.choice(prefs[user])] + 0.9 * rng.normal(size=DIM).astype(np.float32) / np.sqrt(DIM)
        query = (query / np.linalg.norm(query)).astype(np.float32)
        a = memory.global_memory.search(query, 10, user_id=f"user{user}", scope="all")
        b = loaded.global_memory.search(query, 10, user_id=f"user{user}", scope="all")
        keys = lambda m, hits: [(m._label_keys[h[0]], round(h[1], 5)) for h in hits]  # noqa: E731
        if keys(memory, a) != keys(loaded, b):
            return False
    return True


def bench_encoder() -> None:
    memory = LoGoMemory(gate=None)
    texts = [f"Stocks rallied on day {i} as investors weighed the latest inflation data." for i in range(256)]
    start = time.perf_counter()
    memory.encoder.encode(texts)
    print(f"encoder (all-MiniLM-L6-v2, batch 256): {(time.perf_counter() - start) / len(texts) * 1e3:.2f} ms/text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--global-items", type=str, default="100000", help="comma-separated sizes, e.g. 10000,100000")
    parser.add_argument("--global-users", type=int, default=2_000)
    parser.add_argument("--encoder-check", action="store_true", help="also time the packaged MiniLM encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=-1, help="hnswlib threads (-1: all cores)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    bench_writes(rng)
    bench_local(rng)
    for n_items in (int(n) for n in args.global_items.split(",")):
        bench_global_and_persistence(rng, n_items, args.global_users, args.num_threads)
    if args.encoder_check:
        bench_encoder()


if __name__ == "__main__":
    main()
