"""Test helpers for the trainer: tiny models built from configs, a word-level chat tokenizer, interaction streams."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from transformers_spring.memory import HashingEncoder, Interaction, LoGoMemory
from transformers_spring.training import SpringTrainingArguments

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = ["user", "assistant", "system", ":", "write", "a", "headline", "for", "cats", "dogs", "rain", "sun", "vote"]
WORDS += [f"w{i}" for i in range(80)]
VOCAB = len(SPECIALS) + len(WORDS)
PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} : {{ m.content }} <|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}"
)
_COMMON = {
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "initializer_range": 0.2,
}


def make_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **small, **_COMMON))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **small, **_COMMON))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **_COMMON))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**small, **_COMMON))
    else:
        raise ValueError(arch)
    return model.eval()


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
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
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_interactions(
    user: str, n: int, seed: int = 0, start: int = 0, prefix: str | None = None
) -> list[Interaction]:
    """`n` interactions of `user` with varied prompt and response lengths, ids `<prefix>-<i>`."""
    rng = random.Random(f"{user}-{seed}")
    words = [f"w{i}" for i in range(80)] + ["cats", "dogs", "rain", "sun", "vote"]
    items = []
    for i in range(start, start + n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        response = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        items.append(Interaction(user, prompt, response, timestamp=1e9 + i, id=f"{prefix or user}-{i}"))
    return items


def make_args(tmp_path, **kwargs) -> SpringTrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-2,  # tiny random models: a large step makes every update visible
        "lora_dropout": 0.0,
        "logging_steps": 1,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    defaults.update(kwargs)
    return SpringTrainingArguments(**defaults)


def make_memory(buffer_size: int = 50) -> LoGoMemory:
    return LoGoMemory(HashingEncoder(32), scorer="bm25", gate=None, buffer_size=buffer_size, num_threads=1)


def lora_params(model, name: str) -> dict[str, torch.Tensor]:
    """A copy of adapter `name`'s LoRA weights, keyed by parameter name."""
    parts = lambda n: n.split(".")  # noqa: E731
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(part.startswith("lora_") and parts(n)[i + 1] == name for i, part in enumerate(parts(n)[:-1]))
    }
