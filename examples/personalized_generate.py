"""Personalized headline generation with SmolLM2-135M-Instruct and a LoGo memory built from HuffPost news.

For a few authors, the latest article is held out; the memory holds their earlier (article, headline) pairs plus
some other authors' pairs (the global memory). The script prints the headline SmolLM2 writes for the held-out
article without and with personalization (SPRInG's gated dual-path decoding: λ = 0.5, k = 2, greedy, repetition
penalty 1.2), next to the author's real headline.

Runs offline on CPU (~1–2 minutes on 2 cores, most of it embedding the memory):

    python examples/personalized_generate.py
    python examples/personalized_generate.py --authors "Lee Moran" "Ed Mazza" --max-history 300
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import time by huggingface_hub / transformers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from transformers_spring.data import DEFAULT_NEWS_PATH, group_by_user, read_news_jsonl  # noqa: E402
from transformers_spring.generation import Personalization, SpringConfig, SpringForCausalLM  # noqa: E402
from transformers_spring.memory import LoGoMemory  # noqa: E402
from transformers_spring.utils import load_smollm2  # noqa: E402

TASK = "Write a headline for this news article: {article}"
SPRING = SpringConfig(
    interpolation_weight=0.5,
    top_k=2,
    gate=0.3,  # Eq. 5: keep the author's own retrieved items with cosine > 0.3 (global items: the mediator's)
    retrieval_template="Here are headlines this author wrote for earlier articles:\n\n{history}\n\n",
    history_item_template="Article: {prompt}\nHeadline: {response}",
    max_history_tokens=384,
)


def rouge1(prediction: str, reference: str) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return float("nan")
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, prediction)["rouge1"].fmeasure


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_NEWS_PATH)
    parser.add_argument("--authors", nargs="+", default=["Mary Papenfuss", "Lee Moran", "Ron Dicker"])
    parser.add_argument("--max-history", type=int, default=150, help="earlier items per author in the memory")
    parser.add_argument("--global-records", type=int, default=300, help="other authors' items (global memory)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    news = group_by_user(read_news_jsonl(args.data), newest_first=True)
    missing = [author for author in args.authors if len(news.get(author, [])) < 2]
    if missing:
        raise SystemExit(f"authors without enough items in {args.data}: {missing}")

    # Memory: each author's earlier items (the latest one is held out) + other authors' items for the global part.
    held_out, records = {}, []
    for author in args.authors:
        latest, *earlier = news[author]
        held_out[author] = latest
        records += earlier[: args.max_history]
    others = [row for author, rows in news.items() if author not in args.authors and len(rows) >= 5 for row in rows]
    records += others[: args.global_records]
    start = time.perf_counter()
    memory = LoGoMemory(gate=None)  # the packaged all-MiniLM-L6-v2; gating happens in SpringConfig(gate=...)
    memory.add_many(records)
    print(f"memory: {len(memory)} records of {len(memory.users())} authors ({time.perf_counter() - start:.1f} s)")

    model, tokenizer = load_smollm2()
    spring = SpringForCausalLM(model, memory=memory, config=SPRING, tokenizer=tokenizer)
    decoding = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "repetition_penalty": 1.2}

    for author in args.authors:
        article = held_out[author]
        messages = [{"role": "user", "content": TASK.format(article=article.prompt)}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_len = inputs["input_ids"].shape[1]
        plain = spring.generate(**inputs, **decoding)
        personal = spring.generate(
            **inputs,
            personalization=Personalization(
                user=author,
                query=article.prompt,
                retrieval_kwargs={"before": article.timestamp},  # only what the author wrote before this article
            ),
            **decoding,
        )
        info = spring.last_personalization[0]
        plain_text = tokenizer.decode(plain[0, prompt_len:], skip_special_tokens=True).strip()
        personal_text = tokenizer.decode(personal[0, prompt_len:], skip_special_tokens=True).strip()
        date = datetime.fromtimestamp(article.timestamp, tz=UTC).date()
        print(f"\n=== {author} ({date}) ===")
        print(f"article:          {article.prompt}")
        print(f"real headline:    {article.response}")
        for hit in info.items:
            print(f"  retrieved ({hit.source}, {hit.score:.2f}): {hit.interaction.response}")
        print(f"gate open: {info.gate_open}, lambda = {info.weight}, adapter: {info.adapter or 'none'}")
        print(f"without:          {plain_text}   [ROUGE-1 {rouge1(plain_text, article.response):.2f}]")
        print(f"with:             {personal_text}   [ROUGE-1 {rouge1(personal_text, article.response):.2f}]")


if __name__ == "__main__":
    main()
