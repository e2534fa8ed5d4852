"""Test helpers: tiny models, a tiny word-level tokenizer, a fake memory and a slow reference decoder."""

from __future__ import annotations

import math

import tiny_models
import torch

from transformers_spring.memory.interaction import Interaction, MediatedContext, RetrievedItem

VOCAB = 64
PAD, BOS, EOS = tiny_models.PAD, tiny_models.BOS, tiny_models.EOS
ARCHS = ("llama", "qwen2", "gpt2")


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    return tiny_models.make_model(arch, VOCAB, seed)


# ------------------------------------------------------------------------------------------------------ tokenizer
SPECIALS = tiny_models.SPECIALS
WORDS = ["user", "assistant", ":", "history", ";", "headline", "article", "cats", "dogs", "rain", "sun", "vote"]
WORDS += [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
CHAT_TEMPLATE = tiny_models.chat_template(" ")


def make_tokenizer(chat: bool = False):
    tokenizer = tiny_models.make_tokenizer(WORDS, chat_template=CHAT_TEMPLATE if chat else None, padding_side="left")
    assert len(tokenizer.get_vocab()) == VOCAB
    return tokenizer


# ------------------------------------------------------------------------------------------------------ memory
class FakeMemory:
    """Duck-typed memory: returns each user's items (scored by word overlap with the query), counting calls."""

    def __init__(self, records: dict[str, list[tuple[str, str]]], weight: float = 0.5, threshold: float | None = None):
        self.records = {
            user: [
                Interaction(user, prompt, response, timestamp=1e9 + i) for i, (prompt, response) in enumerate(pairs)
            ]
            for user, pairs in records.items()
        }
        self.weight = weight
        self.threshold = threshold
        self.calls: list[dict] = []

    def retrieve_context(self, user_id, query, k=4, *, use_global=None, **kwargs):
        self.calls.append({"user_id": user_id, "query": query, "k": k, "use_global": use_global, **kwargs})
        words = set(query.split())
        hits = [
            RetrievedItem(item, float(len(words & set(item.text.split()))) + 1.0 / (1 + i), "local")
            for i, item in enumerate(self.records.get(user_id, []))
        ]
        hits.sort(key=lambda hit: -hit.score)
        if self.threshold is not None:
            hits = [hit for hit in hits if hit.score > self.threshold]
        hits = hits[:k]
        return MediatedContext(items=hits, weight=self.weight if hits else 0.0, local_hits=hits)


# ------------------------------------------------------------------------------------------------------ reference
def _penalise(ids: list[int], logits: torch.Tensor, penalty: float | None) -> torch.Tensor:
    if penalty is None:
        return logits
    index = torch.tensor([ids])
    score = torch.gather(logits[None], 1, index)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits[None].scatter(1, index, score)[0]


@torch.no_grad()
def reference_generate(
    model,
    prompt: list[int],
    history: list[int],
    weight: float,
    steps: int,
    *,
    penalty: float | None = None,
    do_sample: bool = False,
) -> list[int]:
    """The paper's Algorithm 2 written naively: both full forwards recomputed at every step, no cache, no padding."""
    main, hist, out = list(prompt), list(history), []
    for _ in range(steps):
        logits_main = model(torch.tensor([main])).logits[0, -1].float()
        logits_hist = model(torch.tensor([hist])).logits[0, -1].float()
        log_main = torch.log_softmax(_penalise(main, logits_main, penalty), -1)
        log_hist = torch.log_softmax(_penalise(hist, logits_hist, penalty), -1)
        mixed = torch.logaddexp(log_hist + math.log(weight), log_main + math.log1p(-weight))
        if do_sample:
            token = int(torch.multinomial(torch.softmax(mixed[None], -1), num_samples=1)[0, 0])
        else:
            token = int(torch.argmax(mixed))
        main.append(token)
        hist.append(token)
        out.append(token)
    return out


class ForwardCounter:
    """Counts forwards of a module and records their batch sizes."""

    def __init__(self, module: torch.nn.Module):
        self.batch_sizes: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.batch_sizes.append(int(ids.shape[0]))

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def remove(self):
        self.handle.remove()
