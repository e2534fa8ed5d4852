"""Wall time of a SPRInG update against an All-100 % update of the same period, measured side by side.

For each author (SmolLM2-135M-Instruct, HuffPost news, author = user), the adapter is initialised on period 0. Then
for each later period, every variant below starts from the same adapter state and the same residual buffer, runs
one update of that period, and is timed (the order of the variants rotates from one update to the next):

- All-100 %:            train on every new sample (no scoring, no buffer);
- SPRInG fp32 full:     drift scoring with a full forward per sample (the previous implementation);
- SPRInG fp32 prefix:   the shared prefix (system turn + instruction) computed once per scoring pass (the default);
- SPRInG bf16 prefix:   the same under bfloat16 autocast (`scoring_dtype="bfloat16"`).

The chain then continues from the default variant's result. Printed: per-variant seconds (scoring / training / buffer
rebuild), the ratio to All-100 %, and how many updates selected exactly the samples that fp32 full forwards select.

    python benchmarks/bench_training.py                      # 10 authors x 2 periods, ~10 minutes on 2 CPU cores
    python benchmarks/bench_training.py --authors 4 --update-periods 1
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from transformers_spring.data import (  # noqa: E402
    DEFAULT_NEWS_PATH,
    group_by_user,
    read_news_jsonl,
    select_users,
    temporal_split,
)
from transformers_spring.memory import HashingEncoder, LoGoMemory  # noqa: E402
from transformers_spring.training import SpringTrainer, SpringTrainingArguments  # noqa: E402
from transformers_spring.training.lora import adapter_state, restore_adapter_state  # noqa: E402
from transformers_spring.utils import load_smollm2  # noqa: E402

PROMPT = "Write a headline for this news article: {prompt}"
VARIANTS = {
    "All-100 %": {"selection_ratio": 1.0, "buffer_size": 0},
    "SPRInG fp32 full": {"scoring_shared_prefix": False},
    "SPRInG fp32 prefix": {},
    "SPRInG bf16 prefix": {"scoring_dtype": "bfloat16"},
}
DEFAULT = "SPRInG fp32 prefix"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_NEWS_PATH))
    parser.add_argument("--authors", type=int, default=10, help="The authors with the most items.")
    parser.add_argument("--max-items", type=int, default=60, help="Each author's most recent N items.")
    parser.add_argument("--update-periods", type=int, default=2, help="Timed periods per author (1..4).")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores).")
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    items = read_news_jsonl(args.data, min_items=50)
    streams = group_by_user(items)
    authors = select_users(streams, args.authors, strategy="top")
    model, tokenizer = load_smollm2()
    base_args = SpringTrainingArguments(
        output_dir="bench_training_output", prompt_template=PROMPT, num_train_epochs=args.epochs, use_cpu=True,
        disable_tqdm=True, logging_strategy="no", spring_preset="paper",  # drift top-30 %: what is timed here
    )  # fmt: skip
    variant_args = {name: replace(base_args, **changes) for name, changes in VARIANTS.items()}
    memory = LoGoMemory(HashingEncoder(256), scorer="bm25", gate=None, buffer_size=base_args.buffer_size)

    seconds = defaultdict(lambda: Counter())
    same_selection, selected, updates = Counter(), Counter(), 0
    for author in authors:
        periods = temporal_split(streams[author][-args.max_items :], 5, 0.1)[author]
        trainer = SpringTrainer(
            model=model, args=base_args, user_id=author, period=0, train_interactions=periods[0].train,
            memory=memory, processing_class=tokenizer,
        )  # fmt: skip
        trainer.run_period()
        model = trainer.model
        for period in range(1, 1 + args.update_periods):
            name = trainer.adapter_name
            weights = adapter_state(model, name)
            buffer, scores = list(memory.buffer(author)), dict(memory.buffer_scores(author))
            order = list(VARIANTS)
            order = order[updates % len(order) :] + order[: updates % len(order)]
            outputs = {}
            for variant in order:
                restore_adapter_state(model, weights)
                memory.set_buffer(author, buffer, scores=[scores[item.id] for item in buffer])
                uses_memory = VARIANTS[variant].get("buffer_size", 1) > 0
                tick = time.perf_counter()
                trainer = SpringTrainer(
                    model=model, args=variant_args[variant], user_id=author, period=period,
                    train_interactions=periods[period].train, memory=memory if uses_memory else None,
                    processing_class=tokenizer,
                )  # fmt: skip
                out = trainer.run_period()
                seconds[variant]["total"] += time.perf_counter() - tick
                for part in ("scoring", "train", "buffer"):
                    seconds[variant][part] += out.metrics[f"spring/{part}_seconds"]
                outputs[variant] = (out, adapter_state(model, name), list(memory.buffer(author)))
                selected[variant] += len(out.selected_ids) / out.num_new
            reference = set(outputs["SPRInG fp32 full"][0].selected_ids)
            for variant in VARIANTS:
                same_selection[variant] += set(outputs[variant][0].selected_ids) == reference
            out, state, buffer = outputs[DEFAULT]  # continue the chain from the default variant
            restore_adapter_state(model, state)
            memory.set_buffer(author, buffer, scores=[out.buffer_scores[item.id] for item in buffer])
            updates += 1
        print(f"{author}: {updates} updates timed", flush=True)

    all100 = seconds["All-100 %"]["total"]
    print(
        f"\n{updates} updates ({len(authors)} authors x {args.update_periods} periods, {args.epochs:g} epochs); "
        f"SmolLM2-135M-Instruct fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print(
        "| variant | total s | scoring s | train s | buffer s | vs All-100 % | selected | same selection as fp32 full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        s = seconds[variant]
        print(
            f"| {variant} | {s['total']:.1f} | {s['scoring']:.1f} | {s['train']:.1f} | {s['buffer']:.2f} | "
            f"{s['total'] / all100:.2f}x | {selected[variant] / updates:.3f} | "
            + ("-" if variant == "All-100 %" else f"{same_selection[variant]}/{updates}")
            + " |"
        )


if __name__ == "__main__":
    main()
