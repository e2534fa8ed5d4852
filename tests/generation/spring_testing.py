"""Test helpers: tiny models, a tiny word-level tokenizer, a fake memory and a slow reference decoder."""

from __future__ import annotations

import math

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from transformers_spring.memory.interaction import Interaction, MediatedContext, RetrievedItem

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
ARCHS = ("llama", "qwen2", "gpt2")
# A larger init than the default 0.02 gives peaked, varied next-token distributions, so greedy equality tests
# compare real decisions instead of near-ties.
_COMMON = {
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "initializer_range": 0.2,
}


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **_COMMON,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **_COMMON,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **_COMMON))
    else:
        raise ValueError(arch)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ tokenizer
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = ["user", "assistant", ":", "history", ";", "headline", "article", "cats", "dogs", "rain", "sun", "vote"]
WORDS += [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} : {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}"
)


def make_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.padding_side = "left"
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
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
