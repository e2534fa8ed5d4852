"""Test helpers for the trainer: tiny models built from configs, a word-level chat tokenizer, interaction streams."""

from __future__ import annotations

import random

import tiny_models
import torch

from transformers_spring.memory import HashingEncoder, Interaction, LoGoMemory
from transformers_spring.training import SpringTrainingArguments

SPECIALS = tiny_models.SPECIALS
WORDS = ["user", "assistant", "system", ":", "write", "a", "headline", "for", "cats", "dogs", "rain", "sun", "vote"]
WORDS += [f"w{i}" for i in range(80)]
VOCAB = len(SPECIALS) + len(WORDS)
PAD, BOS, EOS = tiny_models.PAD, tiny_models.BOS, tiny_models.EOS
CHAT_TEMPLATE = tiny_models.chat_template("\n")


def make_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    return tiny_models.make_model(arch, VOCAB, seed)


def make_tokenizer(chat: bool = True):
    return tiny_models.make_tokenizer(WORDS, chat_template=CHAT_TEMPLATE if chat else None)


def make_adapted_model(arch: str = "llama", seed: int = 0, *, r: int = 4, lora_seed: int = 1) -> torch.nn.Module:
    """A tiny model with a non-trivial LoRA adapter "alice" on the query/value projections: its LoRA B weights are
    drawn from `N(0, 0.5²)` under `lora_seed` (B is zero at init, which would make p_adap = p_base)."""
    from peft import LoraConfig

    from transformers_spring.training.lora import create_adapter

    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model = create_adapter(make_model(arch, seed), "alice", LoraConfig(r=r, lora_alpha=8, target_modules=targets), 0)
    generator = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


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


def make_buffer_memory(buffer_size: int = 50) -> LoGoMemory:
    """A LoGoMemory holding residual buffers (BM25, no gate), single-threaded."""
    return LoGoMemory(HashingEncoder(32), scorer="bm25", gate=None, buffer_size=buffer_size, num_threads=1)


def lora_params(model, name: str) -> dict[str, torch.Tensor]:
    """A copy of adapter `name`'s LoRA weights, keyed by parameter name."""
    parts = lambda n: n.split(".")  # noqa: E731
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(part.startswith("lora_") and parts(n)[i + 1] == name for i, part in enumerate(parts(n)[:-1]))
    }
