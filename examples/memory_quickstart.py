"""LoGo memory quickstart on real data: build a memory from the HuffPost news stream with all-MiniLM-L6-v2,
query it, save, reload, and check that authors' own histories predict their next item.

    HF_HUB_OFFLINE=1 python examples/memory_quickstart.py [--data PATH] [--authors 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from transformers_spring import LoGoMemory  # noqa: E402
from transformers_spring.data import DEFAULT_NEWS_PATH, group_by_user, read_news_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_NEWS_PATH), help="News Category JSON Lines file")
    parser.add_argument("--authors", type=int, default=20, help="authors with >= 20 items to evaluate")
    parser.add_argument("--out", default=None, help="where to save the memory (default: a temporary directory)")
    args = parser.parse_args()

    by_author = group_by_user(read_news_jsonl(args.data, min_items=20))
    authors = sorted(by_author, key=lambda a: (-len(by_author[a]), a))[: args.authors]
    history = [item for a in authors for item in by_author[a][:-1]]  # each author's latest item is held out
    held_out = {a: by_author[a][-1] for a in authors}
    print(f"{len(authors)} authors with >= 20 items; {len(history)} history items; latest item held out per author")

    memory = LoGoMemory(gate=None)  # packaged all-MiniLM-L6-v2; no gate, so every hit is shown
    start = time.perf_counter()
    memory.add_many(history, show_progress=True)
    print(f"built {memory} in {time.perf_counter() - start:.1f} s (encoding included)")

    author = authors[0]
    query = held_out[author].prompt
    print(f"\nquery by {author!r}: {query[:100]!r}")
    for hit in memory.retrieve(author, query, k=4):
        print(f"  {hit.source:6s} {hit.score:.3f} {hit.interaction.user_id:20.20s} {hit.interaction.response[:70]!r}")
    ctx = memory.retrieve_context("a new reader", query, k=3)
    # The sharing rule serves only content that >= 3 distinct authors wrote alike (cosine >= 0.75); news authors
    # rarely do, so a cold-start reader usually gets nothing here (docs/memory.md, "The sharing rule").
    print(f"cold-start reader: {len(ctx.items)} global items, suggested lambda {ctx.weight}")

    with tempfile.TemporaryDirectory() as tmp:
        target = args.out or os.path.join(tmp, "news-memory")
        memory.save_pretrained(target)
        print(f"\nsaved to {target}: {sorted(os.listdir(target))}")
        loaded = LoGoMemory.from_pretrained(target)
        same = [h.interaction.id for h in loaded.retrieve(author, query, k=4)] == [
            h.interaction.id for h in memory.retrieve(author, query, k=4)
        ]
        print(f"reloaded {loaded}; same retrieval results: {same}")

    # Own history vs each other author's history: cosine of the held-out item to the earlier items of every author.
    vectors = {a: memory.history_embeddings(a)[1] for a in authors}
    targets = memory.encoder.encode([held_out[a].text for a in authors])
    mean_sim = np.array([[float((vectors[b] @ t).mean()) for b in authors] for t in targets])  # [author, other]
    top5_sim = np.array([[float(np.sort(vectors[b] @ t)[-5:].mean()) for b in authors] for t in targets])
    n = len(authors)
    off = ~np.eye(n, dtype=bool)
    print(f"\nheld-out latest item vs earlier items, {n} authors (own author vs each of the {n - 1} others):")
    for name, sim in (("mean cosine to all items", mean_sim), ("mean cosine to the 5 closest items", top5_sim)):
        own, other = np.diag(sim), sim[off].reshape(n, n - 1)
        pairs = float((own[:, None] > other).mean())
        rank1 = int((own > other.max(axis=1)).sum())
        print(
            f"  {name:36s} own {own.mean():.3f} vs other authors {other.mean():.3f}; own closer in "
            f"{pairs:.1%} of author pairs; own author ranked first for {rank1}/{n}"
        )


if __name__ == "__main__":
    main()
