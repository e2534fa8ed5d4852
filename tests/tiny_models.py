"""Tiny random causal LMs and a word-level tokenizer, shared by the test helpers of `generation/` and `training/`.

Each helper module fixes its own vocabulary, chat-template separator and padding side and calls these builders
(`spring_testing.py` and `training_testing.py`). Importable as `tiny_models`: pytest puts `tests/` on `sys.path` for the
root `conftest.py`, and scripts run as subprocesses add it themselves.
"""

from __future__ import annotations

import pytest
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

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
PAD, BOS, EOS = 0, 1, 2
ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def chat_template(separator: str) -> str:
    """A ChatML-like template with space-separated tokens (the tokenizer splits on whitespace); `separator` follows
    each `<|im_end|>`."""
    return (
        "{% for m in messages %}<|im_start|> {{ m.role }} : {{ m.content }} <|im_end|>" + separator + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}"
    )


def make_model(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
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
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **_SMALL, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **_SMALL, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**_SMALL, **common))
    else:
        raise ValueError(arch)
    return model.eval()


def make_tokenizer(
    words: list[str], *, chat_template: str | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `SPECIALS + words` (ids in that order; unknown words map to `[UNK]`)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(words))}
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
    tokenizer.padding_side = padding_side
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes each forward
    ~100x slower; restored after each test so other test directories are unaffected. Autouse in the directories whose
    conftest imports it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
