"""The test suite's helpers: tiny random causal LMs of eight architectures, a word-level tokenizer, a fake memory, a
slow reference decoder, forward counters, interaction streams and trainer arguments.

Importable as `testing_utils` from every test directory (`pythonpath = tests` in setup.cfg's `[tool:pytest]`);
scripts that the tests run as subprocesses get `tests/` through the `PYTHONPATH` of their environment.

Two vocabularies (`GENERATION_VOCAB`, `TRAINING_VOCAB`) keep what the generation and the training tests were written
against: the generation tests hard-code token ids of a 64-token vocabulary and decode left-padded batches, the
training tests format chats with a newline after each turn and pad on the right. Models and tokenizers of either come
from the same two factories, `make_model` and `make_tokenizer`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LogitsProcessorList, PreTrainedTokenizerFast

from transformers_spring.memory import HashingEncoder, Interaction, LoGoMemory
from transformers_spring.records import MediatedContext, RetrievedItem

# The memory backends the memory suite runs on (the `backend` fixture in conftest.py): in-process, and Milvus Lite
# answering the searches or storing the rows behind the in-process mirror.
BACKENDS = ("default", "milvus", "milvus-process")

# ------------------------------------------------------------------------------------------------------ vocabulary
SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]")
PAD, BOS, EOS = 0, 1, 2


def chat_template(separator: str) -> str:
    """A ChatML-like template with space-separated tokens (the tokenizer splits on whitespace); `separator` follows
    each `<|im_end|>`."""
    return (
        "{% for m in messages %}<|im_start|> {{ m.role }} : {{ m.content }} <|im_end|>" + separator + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}"
    )


@dataclass(frozen=True)
class TinyVocab:
    """The words of a tiny tokenizer (after `SPECIALS`), the separator its chat template puts after each turn and its
    padding side."""

    words: tuple[str, ...]
    separator: str
    padding_side: str

    @property
    def size(self) -> int:
        return len(SPECIALS) + len(self.words)

    @property
    def chat_template(self) -> str:
        return chat_template(self.separator)


_GENERATION_WORDS = ("user", "assistant", ":", "history", ";", "headline", "article", "cats", "dogs", "rain", "sun")
_GENERATION_WORDS += ("vote",)
# Exactly 64 tokens, left padding (decoder-only batches): the generation tests use fixed ids below 64.
GENERATION_VOCAB = TinyVocab(
    _GENERATION_WORDS + tuple(f"w{i}" for i in range(64 - len(SPECIALS) - len(_GENERATION_WORDS))), " ", "left"
)
_TRAINING_WORDS = ("user", "assistant", "system", ":", "write", "a", "headline", "for", "cats", "dogs", "rain", "sun")
_TRAINING_WORDS += ("vote",)
# 99 tokens, one turn per line, right padding (training batches).
TRAINING_VOCAB = TinyVocab(_TRAINING_WORDS + tuple(f"w{i}" for i in range(80)), "\n", "right")


def make_tokenizer(vocab: TinyVocab = GENERATION_VOCAB, *, chat: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `SPECIALS + vocab.words` (ids in that order; unknown words map to
    `[UNK]`), padding on `vocab.padding_side`, with `vocab.chat_template` when `chat`."""
    ids = {token: i for i, token in enumerate(SPECIALS + vocab.words)}
    backend = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.padding_side = vocab.padding_side
    if chat:
        tokenizer.chat_template = vocab.chat_template
    assert len(tokenizer.get_vocab()) == vocab.size
    return tokenizer


# ------------------------------------------------------------------------------------------------------ models
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt2", "gpt_neox")
# The LoRA targets of each architecture's attention (query/value projections, or the fused QKV projection).
LORA_TARGETS = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "phi3": ["qkv_proj"]}
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _build(arch: str, common: dict) -> torch.nn.Module:
    import transformers as tf

    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **_SMALL, **common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **_SMALL, **common))
    if arch == "qwen3":  # head_dim defaults to 128 instead of hidden / heads
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **_SMALL, **common))
    if arch == "mistral":  # full attention: the fused decoder stacks its cache
        return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **_SMALL, **common))
    if arch == "phi3":  # fused qkv_proj / gate_up_proj, full attention
        return tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, sliding_window=None, **_SMALL, **common))
    if arch == "gemma3":
        # A sliding window of 4 on the first layer, full attention on the second: the cache mixes
        # DynamicSlidingWindowLayer and DynamicLayer (the fused decoder falls back to processor mode), and every test
        # prompt is longer than the window. Untied embeddings: with Gemma's tied, sqrt(hidden)-scaled embeddings a
        # 2-layer random model only repeats its last input token. query_pre_attn_scalar = head_dim: the usual
        # 1/sqrt(head_dim) attention scale (the default 256 makes attention nearly uniform).
        config = tf.Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=False,
            **_SMALL,
            **common,
        )
        return tf.Gemma3ForCausalLM(config)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_SMALL, **common))
    raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHS}")


def make_model(arch: str, vocab_size: int = GENERATION_VOCAB.size, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 32-wide random model of `arch` (one of `ARCHS`) in eval mode, initialised under `seed`. The init
    range 0.2 (instead of 0.02) gives peaked, varied next-token distributions, so that greedy equality tests compare
    real decisions instead of near-ties and training updates are visible."""
    common = {
        "vocab_size": vocab_size,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "initializer_range": 0.2,
    }
    torch.manual_seed(seed)
    return _build(arch, common).eval()


def make_adapted_model(
    arch: str = "llama", seed: int = 0, *, vocab_size: int = GENERATION_VOCAB.size, r: int = 4, lora_seed: int = 1
) -> torch.nn.Module:
    """A tiny model with a non-trivial LoRA adapter "alice" on its attention projections (`LORA_TARGETS`): its LoRA B
    weights are drawn from `N(0, 0.5²)` under `lora_seed` (B is zero at init, which would make p_adap = p_base)."""
    from peft import LoraConfig

    from transformers_spring.training.lora import create_adapter

    targets = LORA_TARGETS.get(arch, ["q_proj", "v_proj"])
    base = make_model(arch, vocab_size, seed)
    model = create_adapter(base, "alice", LoraConfig(r=r, lora_alpha=8, target_modules=targets), 0)
    generator = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def lora_params(model, name: str) -> dict[str, torch.Tensor]:
    """A copy of adapter `name`'s LoRA weights, keyed by parameter name."""
    parts = lambda n: n.split(".")  # noqa: E731
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(part.startswith("lora_") and parts(n)[i + 1] == name for i, part in enumerate(parts(n)[:-1]))
    }


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


# ------------------------------------------------------------------------------------------------ dual-path decoding
NEW_TOKENS = 12
# Two rows of different lengths, left-padded, with different history lengths: padding is exercised everywhere. Every
# prompt and history is longer than gemma3's sliding window (4).
PROMPTS = [[5, 6, 7, 8, 15], [9, 10, 11, 12, 13, 14]]
HISTORIES = [[20, 21, 22, 23, 24, 25, 5, 6, 7, 8, 15], [30, 31, 32, 9, 10, 11, 12, 13, 14]]
GREEDY = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> left-padded `(input_ids, attention_mask)`."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


class DualPathRun(NamedTuple):
    tokens: torch.Tensor  # the new tokens, (rows, NEW_TOKENS)
    processor: object  # the RetrievalInterpolationLogitsProcessor
    decoder: object | None  # the FusedDualPathDecoder, None in processor mode


def run_processor(model, weight, *, fused=False, penalty=None, prompts=PROMPTS, histories=HISTORIES, **kwargs):
    """Greedy `generate()` of `prompts` mixed with `histories` at λ = `weight` (a float or one per row), through a
    `RetrievalInterpolationLogitsProcessor`, in processor mode or (`fused`) with a `FusedDualPathDecoder`."""
    from transformers_spring.generation import FusedDualPathDecoder, RetrievalInterpolationLogitsProcessor

    ids, mask = left_pad(prompts)
    hist, hist_mask = left_pad(histories)
    processor = RetrievalInterpolationLogitsProcessor(
        model, hist, hist_mask, weight, repetition_penalty=penalty, prompt_attention_mask=mask, **kwargs
    )
    decoder = FusedDualPathDecoder(processor) if fused else None
    extra = {"custom_generate": decoder} if fused else {}
    out = model.generate(
        ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]), **GREEDY, **extra
    )
    return DualPathRun(out[:, ids.shape[1] :], processor, decoder)


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


# ------------------------------------------------------------------------------------------ decoding options
# Two rows whose retrieved histories share spans with their prompts: the copy path and the adaptive λ are compared
# with slow references on them (tests/generation/test_copying.py, test_adaptive_weight.py).
OPTION_NEW = 10
OPTION_GREEDY = {"max_new_tokens": OPTION_NEW, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}
OPTION_TEXTS = ["cats rain w1 w2 w3 cats rain", "dogs vote w4 w5 dogs"]
OPTION_HISTORY = [
    [Interaction("alice", "cats", "w1 w2 w9 w10 cats rain w11"), Interaction("alice", "rain", "w12 w13")],
    [Interaction("bob", "dogs", "vote w4 w5 w6 w7")],
]


def option_wrapper(model, **config):
    """A `SpringForCausalLM` over `model` with λ = 0.5 stated (the slow references mix with it, whatever the
    library's default) and `config`'s other fields."""
    from transformers_spring.generation import SpringConfig, SpringForCausalLM

    return SpringForCausalLM(model, config=SpringConfig(**{"interpolation_weight": 0.5, **config}),
                             tokenizer=make_tokenizer())  # fmt: skip


def option_score_case():
    """`(model, tokenizer, batch, gold)`: a tiny Llama, `OPTION_TEXTS` encoded and one continuation per row to score
    (the first continues spans of row 0's history)."""
    tokenizer = make_tokenizer()
    gold = [tokenizer("w2 w3 cats rain w11 w12", add_special_tokens=False)["input_ids"], [19, 40, 33, 21]]
    return make_model("llama"), tokenizer, encode_texts(OPTION_TEXTS), gold


def encode_texts(texts):
    """`texts` tokenized as one left-padded batch."""
    return make_tokenizer()(texts, return_tensors="pt", padding=True)


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


def make_buffer_memory(buffer_size: int = 50) -> LoGoMemory:
    """A LoGoMemory holding residual buffers (BM25, no gate), single-threaded."""
    return LoGoMemory(HashingEncoder(32), scorer="bm25", gate=None, buffer_size=buffer_size, num_threads=1)


TOPICS = {
    "cats": "cat kitten purr whiskers litter feline meow",
    "rockets": "rocket launch orbit booster nasa spacex payload",
    "bread": "bread bakery sourdough flour oven yeast crust",
    "football": "football goal striker league match referee penalty",
    "elections": "election vote ballot senate campaign poll candidate",
    "weather": "storm rain forecast hurricane flood wind snow",
}


def topical(user: str, topic: str, i: int, ts: float | None = None) -> Interaction:
    """A record about `topic` (one of `TOPICS`) whose words vary with `i` (so records are not near-duplicates)."""
    words = TOPICS[topic].split()
    picked = " ".join(words[(i + j) % len(words)] for j in range(4))
    return Interaction(user, f"{picked} report {i} by {user}", f"{topic} headline {i} {user}", timestamp=ts or 1e9 + i)


def populated(make_memory, users=6, per_user=8, **kwargs):
    """Users u0..u{n-1}; even users write about cats, odd users about rockets."""
    kwargs.setdefault("min_community_users", 2)
    memory = make_memory(**kwargs)
    memory.add_many(
        topical(f"u{u}", "cats" if u % 2 == 0 else "rockets", i, ts=1e9 + 100 * u + i)
        for u in range(users)
        for i in range(per_user)
    )
    return memory


# ------------------------------------------------------------------------------------------------------ training
def make_interactions(
    user: str, n: int, seed: int = 0, start: int = 0, prefix: str | None = None
) -> list[Interaction]:
    """`n` interactions of `user` with varied prompt and response lengths (words of `TRAINING_VOCAB`), ids
    `<prefix>-<i>`."""
    rng = random.Random(f"{user}-{seed}")
    words = [f"w{i}" for i in range(80)] + ["cats", "dogs", "rain", "sun", "vote"]
    items = []
    for i in range(start, start + n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        response = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        items.append(Interaction(user, prompt, response, timestamp=1e9 + i, id=f"{prefix or user}-{i}"))
    return items


def make_args(tmp_path, **kwargs):
    """`SpringTrainingArguments` for tiny models on CPU, writing under `tmp_path`."""
    from transformers_spring.training import SpringTrainingArguments

    defaults = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-2,  # tiny random models: a large step makes every update visible
        "selection_ratio": 0.3,  # drift selection, which most tests exercise (the default trains on every sample)
        "lora_dropout": 0.0,
        "logging_steps": 1,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    defaults.update(kwargs)
    return SpringTrainingArguments(**defaults)


# ------------------------------------------------------------------------------------------------------ erasure
def find_traces(folder, *needles: str) -> list[str]:
    """Every place under `folder` (any file's bytes, hidden files and leftovers included, and every path name)
    where one of `needles` occurs, as `"<path>: <needle>"`; empty when none does."""
    from pathlib import Path

    hits = []
    for path in sorted(Path(folder).rglob("*")):
        names = [str(path.relative_to(folder))]
        data = path.read_bytes() if path.is_file() else b""
        for needle in needles:
            if needle in names[0] or needle.encode("utf-8") in data:
                hits.append(f"{path}: {needle}")
    return hits


def edit_memory_config(target, **changes):
    """Edits a saved memory's `config.json` in place: `changes` maps dotted paths (`"counts.records"`) to values."""
    import json

    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    (target / "config.json").write_text(json.dumps(config))
