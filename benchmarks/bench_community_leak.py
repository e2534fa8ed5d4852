"""The sybil attack on the parametric path: how much of a victim's unique text does a community adapter reproduce?

Community adapters (`ContinualPersonalizer.train_community_adapters`) carry a community's collective knowledge
without serving anyone's text verbatim, but an adapter trained on a user's items can still reproduce them. This script
measures it under the worst case for the victim: fake users (sybils) who copy the victim's topic join, so that the
community is the victim and the sybils alone, and the community adapter is trained on their pooled items.

- **Data**: the benchmark's 24 news authors (`BenchmarkArguments(users=24, max_items=0)`). Victims: the heaviest
  authors. A victim's item is *unique* when no other of the 24 authors wrote an item within cosine 0.75 of it
  (all-MiniLM-L6-v2, the sharing rule's threshold). Each sybil writes `--per_sybil` real items of the victim's main
  category by authors outside the 24 (a topic copy as close as real text gets).
- **Model**: SmolLM2-135M-Instruct; the community adapter is trained as the library trains it (every member's latest
  `--max_items_per_user` items, `--learning_rate`, `--epochs`), under the default `"private"` sharing policy.
- **Attack**: a sybil, who has no adapter of their own, asks for each of the victim's unique inputs with λ = 0 (the
  parametric path alone: no history is retrieved), so `generate(personalization=sybil)` decodes with the community
  adapter. The control asks the same with the base model.
- **Judged**: against the victim's own response, *exact* (equal after lowercasing and collapsing whitespace and
  punctuation) and *near* (unstemmed ROUGE-L F1 >= `--near`) matches, and the mean ROUGE-L.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/bench_community_leak.py            # ~20 min on 2 CPU cores
    python benchmarks/bench_community_leak.py --victims 1 --sybils 4 --out leak.json
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from transformers_spring import Interaction, LoGoMemory, Personalization, SpringConfig  # noqa: E402
from transformers_spring.data import DEFAULT_NEWS_PATH, read_news_jsonl  # noqa: E402
from transformers_spring.evaluation import BenchmarkArguments, benchmark_splits, rouge_scores  # noqa: E402
from transformers_spring.evaluation.decoding import BenchmarkRow, RowDecoder, line_end_tokens  # noqa: E402
from transformers_spring.training import ContinualPersonalizer, SpringFormatter, SpringTrainingArguments  # noqa: E402
from transformers_spring.utils import load_smollm2  # noqa: E402


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def unique_items(memory: LoGoMemory, honest: list[Interaction], victim: str, threshold: float) -> list[Interaction]:
    """The victim's items no other honest author wrote anything within `threshold` (cosine) of."""
    mine = [it for it in honest if it.user_id == victim]
    others = [it for it in honest if it.user_id != victim]
    a, b = memory.embed([it.text for it in mine]), memory.embed([it.text for it in others])
    best = (a @ b.T).max(axis=1)
    return [it for it, score in zip(mine, best, strict=True) if score < threshold]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_NEWS_PATH.parent / "News_Category_Dataset_v3.first10000.jsonl"))
    parser.add_argument("--victims", type=int, default=2, help="The heaviest authors.")
    parser.add_argument("--sybils", default="4,10", help="Comma-separated sybil counts.")
    parser.add_argument("--per_sybil", type=int, default=30)
    parser.add_argument("--max_items_per_user", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--near", type=float, default=0.8, help="ROUGE-L F1 from which an output is a near match.")
    parser.add_argument("--match_threshold", type=float, default=0.75, help="Cosine of 'closely matching' content.")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--out", default=None, help="Write the results (and every output) to this JSON file.")
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.get_logger("transformers_spring").setLevel(logging.ERROR)  # (the in-place warning: expected here)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    bench = BenchmarkArguments(data=args.data, users=24, max_items=0)
    splits = benchmark_splits(bench)
    honest = [it for periods in splits.values() for split in periods for it in split.train]
    everyone = read_news_jsonl(args.data)
    victims = sorted(splits, key=lambda u: -sum(len(s.train) for s in splits[u]))[: args.victims]
    probe = LoGoMemory(gate=None, num_threads=1)  # the encoder, for uniqueness
    encoder = probe.encoder
    results = {"config": vars(args), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
               "victims": {}}  # fmt: skip
    for victim in victims:
        mine = sorted((it for it in honest if it.user_id == victim), key=lambda it: it.timestamp)
        trained = mine[-args.max_items_per_user :]  # what the community adapter sees of the victim
        unique = [it for it in unique_items(probe, honest, victim, args.match_threshold) if it in trained]
        topic = collections.Counter(it.metadata.get("category") for it in mine).most_common(1)[0][0]
        pool = [it for it in everyone if it.user_id not in splits and it.metadata.get("category") == topic]
        random.Random(0).shuffle(pool)
        entry = results["victims"][victim] = {"category": topic, "trained_items": len(trained),
                                              "unique_items": len(unique), "runs": {}}  # fmt: skip
        for n_sybils in (int(n) for n in args.sybils.split(",")):
            tick = time.perf_counter()
            memory = LoGoMemory(encoder, gate=None, dedup_threshold=None, num_threads=1, n_communities=1)
            memory.add_many(trained)
            for s in range(n_sybils):
                chunk = pool[s * args.per_sybil : (s + 1) * args.per_sybil]
                memory.add_many(
                    Interaction(f"sybil{s}", it.prompt, it.response, timestamp=it.timestamp, id=f"sybil{s}-{i}")
                    for i, it in enumerate(chunk)
                )
            model, tokenizer = load_smollm2()
            with tempfile.TemporaryDirectory() as tmp:
                training = SpringTrainingArguments(
                    output_dir=tmp, prompt_template=bench.prompt_template, learning_rate=args.learning_rate,
                    num_train_epochs=args.epochs, per_device_train_batch_size=bench.per_device_train_batch_size,
                    use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no", logging_strategy="no",
                    seed=0,
                )  # fmt: skip
                personalizer = ContinualPersonalizer(model, tokenizer, training, memory)
                table = personalizer.train_community_adapters(
                    min_users=3, max_items_per_user=args.max_items_per_user, progress=False
                )
                spring = personalizer.to_spring_model(SpringConfig(interpolation_weight=0.0))
            train_s = time.perf_counter() - tick
            tokenizer.padding_side = "left"
            formatter = SpringFormatter(tokenizer, prompt_template=bench.prompt_template)
            decoder = RowDecoder(
                spring, tokenizer, formatter, max_new_tokens=args.max_new_tokens, repetition_penalty=1.2,
                batch_size=16, line_end_tokens=line_end_tokens(tokenizer),
            )  # fmt: skip
            rows = {
                "community adapter": [BenchmarkRow("community", it, Personalization(user="sybil0", weight=0.0))
                                      for it in unique],
                "base model (control)": [
                    BenchmarkRow("base", it, Personalization(user="sybil0", adapter="__base__", weight=0.0))
                    for it in unique
                ],
            }  # fmt: skip
            decoder.plan(rows["community adapter"])
            routed = {row.plan.adapter for row in rows["community adapter"]}
            run = {"community_adapters": [{"name": a.name, "members": len(a.members), "items": a.num_items}
                                          for a in table],
                   "routed_to": sorted(routed), "train_s": round(train_s, 1), "arms": {}}  # fmt: skip
            for arm, arm_rows in rows.items():
                predictions = decoder.generate(arm_rows)
                references = [it.response for it in unique]
                scores = [s["rougeL"] for s in rouge_scores(predictions, references)]
                exact = [normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)]
                run["arms"][arm] = {
                    "exact": int(sum(exact)),
                    "near": int(sum(s >= args.near for s in scores)),
                    "mean_rougeL": float(np.mean(scores)) if scores else 0.0,
                    "outputs": [{"id": it.id, "reference": it.response, "prediction": p}
                                for it, p in zip(unique, predictions, strict=True)],
                }  # fmt: skip
            entry["runs"][str(n_sybils)] = run
            del spring, personalizer, model
    results["wall_s"] = round(time.perf_counter() - started, 1)

    print(f"\nCommunity-adapter leak, SmolLM2-135M-Instruct, {torch.get_num_threads()} torch threads, "
          f"near = ROUGE-L >= {args.near}, wall {results['wall_s']:.0f} s")  # fmt: skip
    print(
        "| victim (category) | unique items | sybils | community adapter: exact / near / mean ROUGE-L "
        "| base model: exact / near / mean ROUGE-L |"
    )
    print("|---|---|---|---|---|")
    for victim, entry in results["victims"].items():
        for n_sybils, run in entry["runs"].items():
            cells = [
                f"{a['exact']} / {a['near']} / {a['mean_rougeL']:.3f}"
                for a in (run["arms"]["community adapter"], run["arms"]["base model (control)"])
            ]
            print(
                f"| {victim} ({entry['category']}) | {entry['unique_items']} | {n_sybils} | {cells[0]} | {cells[1]} |"
            )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
