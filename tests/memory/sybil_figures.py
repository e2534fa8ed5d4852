"""The sybil attack on the collective memory, on real data: fake users who copy a victim's topic try to pull the
victim's unique items out of the global memory through the public API.

    HF_HUB_OFFLINE=1 python tests/memory/sybil_figures.py [--data PATH] [--victims 6]

The memory holds the training items of the benchmark's 24 news authors (all-MiniLM-L6-v2). For each victim (the
heaviest authors), 4 and then 10 fake users join, each writing 30 real headlines of the victim's main category by
authors outside the memory (a topic copy as close as real text gets), and query with 50 of the victim's own inputs, at
k = 50, in both global scopes. A victim's item is *unique* when no other real user backs it (no matching
content from another author). The script prints, per victim and sybil count, how many unique items any sybil
received, with the sharing rule on (the defaults) and off (`min_contributors=1`, the old behaviour).
"""

from __future__ import annotations

import argparse
import collections
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers_spring import LoGoMemory  # noqa: E402
from transformers_spring.data import DEFAULT_NEWS_PATH, read_news_jsonl  # noqa: E402
from transformers_spring.evaluation import BenchmarkArguments, benchmark_splits  # noqa: E402
from transformers_spring.records import Interaction  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_NEWS_PATH.parent / "News_Category_Dataset_v3.first10000.jsonl"))
    parser.add_argument("--victims", type=int, default=6)
    parser.add_argument("--per_sybil", type=int, default=30)
    parser.add_argument("--queries", type=int, default=50, help="victim inputs each sybil queries with")
    args = parser.parse_args()

    splits = benchmark_splits(BenchmarkArguments(data=args.data, users=24, max_items=0))
    honest = [it for periods in splits.values() for split in periods for it in split.train]
    everyone = read_news_jsonl(args.data)
    victims = sorted(splits, key=lambda u: -sum(len(s.train) for s in splits[u]))[: args.victims]
    encoder = None  # all-MiniLM-L6-v2
    unique: dict[str, set[str]] = {}
    for rule_on in (True, False):
        rng = random.Random(0)
        rule = {} if rule_on else {"min_contributors": 1}
        memory = LoGoMemory(encoder, gate=None, dedup_threshold=None, num_threads=1, **rule)
        encoder = memory.encoder  # one encoder for both runs
        memory.add_many(honest)
        gm = memory.global_memory
        label = f"rule on (min_contributors={gm.min_contributors}, match_threshold={gm.match_threshold})"
        label = label if rule_on else "rule off (min_contributors=1)"
        served = sum(gm.is_servable(lbl) for lbl in memory._label_keys)
        print(f"\n{label}: {served} of {len(memory._label_keys)} shared items servable before any sybil")
        for victim in victims:
            mine = [it for it in honest if it.user_id == victim]
            if rule_on:  # unique: no other real author backs it at the rule's threshold, before sybils join
                unique[victim] = {
                    rid
                    for (user, rid), lbl in memory._labels.items()
                    if user == victim and gm.support.backers(lbl) == 0
                }
            topic = collections.Counter(it.metadata.get("category") for it in mine).most_common(1)[0][0]
            pool = [it for it in everyone if it.user_id not in splits and it.metadata.get("category") == topic]
            rng.shuffle(pool)
            queries = [it.prompt for it in rng.sample(mine, min(args.queries, len(mine)))]
            added = 0
            for n_sybils in (4, 10):
                for s in range(added, n_sybils):
                    chunk = pool[s * args.per_sybil : (s + 1) * args.per_sybil]
                    memory.add_many(
                        Interaction(f"sybil{s}", it.prompt, it.response, timestamp=it.timestamp, id=f"sybil{s}-{i}")
                        for i, it in enumerate(chunk)
                    )
                added = n_sybils
                received = set()
                for s in range(n_sybils):
                    for query in queries:
                        for scope in ("own", "all"):
                            context = memory.retrieve_context(f"sybil{s}", query, k=50, scope=scope)
                            received |= {
                                h.interaction.id for h in context.global_hits if h.interaction.user_id == victim
                            }
                print(
                    f"  victim {victim!r} ({topic}, {len(mine)} items, {len(unique[victim])} unique): {n_sybils} "
                    f"sybils received {len(received & unique[victim])} unique items ({len(received)} of the victim's "
                    "items in all)"
                )
            for s in range(added):
                memory.forget_user(f"sybil{s}")


if __name__ == "__main__":
    main()
