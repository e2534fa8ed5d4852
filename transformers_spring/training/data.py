"""Tokenization shared by drift scoring, training and evaluation: one prompt/response layout for all three."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from ..records import Interaction
from ..utils.modeling import pad_token_id

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedSample:
    """One interaction, tokenized: `input_ids = prompt tokens + response tokens`.

    Args:
        id (`str`): the interaction's id.
        user_id (`str`): whose interaction it is.
        input_ids (`tuple[int, ...]`): prompt then response token ids (at most `max_length`).
        prompt_length (`int`): how many leading tokens are prompt; the rest is the response (≥ 1 token each).
        truncated (`bool`): whether the prompt or the response was cut to fit `max_length`.
    """

    id: str
    user_id: str
    input_ids: tuple[int, ...]
    prompt_length: int
    truncated: bool = False

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.prompt_length

    @functools.cached_property  # computed once (a frozen dataclass without slots still has an instance __dict__)
    def cache_key(self) -> str:
        """Identifies the exact scored text: user, id and a hash of the token ids and the prompt/response split. Any
        change of text, tokenizer, template or `max_length` gives a new key."""
        digest = hashlib.sha256()
        digest.update(str(self.prompt_length).encode())
        digest.update(b"|")
        digest.update(",".join(map(str, self.input_ids)).encode())
        return f"{self.user_id}\x1f{self.id}\x1f{digest.hexdigest()[:32]}"


class SpringFormatter:
    r"""
    Turns interactions into token ids the same way for drift scoring, training and evaluation.

    With a chat template (and `use_chat_template=True`), the prompt is the template's rendering of
    `[system?, user: prompt_template.format(prompt=...)]` with the generation prompt, exactly what
    `tokenizer.apply_chat_template(..., add_generation_prompt=True)` gives at inference; the response is what the
    template appends for the assistant turn (the text plus its end-of-turn marker, e.g. `<|im_end|>`). Without a chat
    template: `tokenizer(prompt) + tokenizer(response) + [eos]`.

    Samples longer than `max_length` lose the start of their prompt (the end, with the generation prompt, is kept);
    a response longer than `max_length - 1` on its own is cut from the right with a warning.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        max_length (`int`, *optional*, defaults to 768): longest prompt + response.
        prompt_template (`str`, *optional*, defaults to `"{prompt}"`): the user message; `{prompt}`, `{user_id}`.
        use_chat_template (`bool`, *optional*, defaults to `True`): use the tokenizer's chat template if it has one.
        system_prompt (`str`, *optional*): a system message (chat template only).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 768,
        prompt_template: str = "{prompt}",
        use_chat_template: bool = True,
        system_prompt: str | None = None,
    ):
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(
                "`processing_class` (the tokenizer) is required to tokenize interactions; got "
                f"{type(tokenizer).__name__}."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self._specials = {s for s in getattr(tokenizer, "all_special_tokens", []) if s}
        self._warned_template = False

    @classmethod
    def from_args(cls, tokenizer: Any, args: Any) -> SpringFormatter:
        return cls(tokenizer, args.max_length, args.prompt_template, args.use_chat_template, args.system_prompt)

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, default=0)  # 0: masked out

    def _messages(self, interaction: Interaction) -> list[dict]:
        content = self.prompt_template.format(prompt=interaction.prompt, user_id=interaction.user_id)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": content}]

    def prompt_text(self, interaction: Interaction) -> str:
        """The prompt exactly as generation sees it (chat-formatted with the generation prompt, when chat)."""
        messages = self._messages(interaction)
        if not self.chat:
            return messages[-1]["content"]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _response_text(self, interaction: Interaction, prompt: str) -> str | None:
        """What the chat template appends after `prompt` for the assistant turn, or None when it cannot tell."""
        full = self.tokenizer.apply_chat_template(
            self._messages(interaction) + [{"role": "assistant", "content": interaction.response}], tokenize=False
        )
        if not full.startswith(prompt) or len(full) == len(prompt):
            return None
        suffix = full[len(prompt) :]
        stripped = suffix.rstrip()
        # Keep the end-of-turn marker in the loss, not the template's trailing newline after it.
        if stripped != suffix and any(stripped.endswith(s) for s in self._specials):
            suffix = stripped
        return suffix

    def encode(self, interaction: Interaction) -> EncodedSample:
        """Tokenizes one interaction (see the class docstring for the layout and truncation)."""
        tok = self.tokenizer
        prompt = self.prompt_text(interaction)
        if self.chat:
            response = self._response_text(interaction, prompt)
            if response is None:
                if not self._warned_template:
                    logger.warning(
                        "The chat template's rendering of the assistant turn does not extend the generation prompt; "
                        "using `response + eos` as the response tokens instead."
                    )
                    self._warned_template = True
                response_ids = self._plain_response_ids(interaction.response)
            else:
                response_ids = tok(response, add_special_tokens=False)["input_ids"]
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tok(prompt)["input_ids"]
            response_ids = self._plain_response_ids(interaction.response)
        if not prompt_ids:  # the first response token needs a position to be predicted from
            bos = tok.bos_token_id if tok.bos_token_id is not None else self.pad_token_id
            prompt_ids = [bos]
        if not response_ids:
            raise ValueError(f"interaction {interaction.id!r}: `response` tokenizes to nothing.")
        prompt_ids, response_ids = list(prompt_ids), list(response_ids)
        truncated = False
        limit = self.max_length
        if len(response_ids) > limit - 1:
            logger.warning(
                f"interaction {interaction.id!r}: the response alone has {len(response_ids)} tokens, more than "
                f"`max_length` - 1 = {limit - 1}; it is cut from the right."
            )
            response_ids = response_ids[: limit - 1]
            truncated = True
        room = limit - len(response_ids)
        if len(prompt_ids) > room:
            logger.info(
                f"interaction {interaction.id!r}: prompt cut from {len(prompt_ids)} to {room} tokens (from the left) "
                f"to fit `max_length` = {limit}."
            )
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
            truncated = True
        return EncodedSample(
            id=interaction.id,
            user_id=interaction.user_id,
            input_ids=tuple(prompt_ids + response_ids),
            prompt_length=len(prompt_ids),
            truncated=truncated,
        )

    def _plain_response_ids(self, response: str) -> list[int]:
        ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None else ids

    def encode_many(self, interactions: Sequence[Interaction]) -> list[EncodedSample]:
        samples = [self.encode(item) for item in interactions]
        cut = sum(sample.truncated for sample in samples)
        if cut:
            logger.info(f"{cut} of {len(samples)} sample(s) were truncated to `max_length` = {self.max_length}.")
        return samples


class SpringDataset(torch.utils.data.Dataset):
    """A list of [`EncodedSample`] as training features (`input_ids`, `labels`); labels are -100 on the prompt when
    `response_only_loss`."""

    def __init__(self, samples: Sequence[EncodedSample], response_only_loss: bool = True):
        self.samples = list(samples)
        self.response_only_loss = response_only_loss

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample = self.samples[index]
        ids = list(sample.input_ids)
        cut = sample.prompt_length if self.response_only_loss else 1
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]}


def label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a target token and those tokens, from `(batch, seq)` labels (-100 = no target).

    Position `t` predicts label `t + 1`. Returns `keep`, a `(batch, seq)` bool mask of those positions, and the target
    ids, flattened row-major in the order of `keep` (the layout of [`response_logits`])."""
    is_target = labels[:, 1:] != IGNORE_INDEX
    keep = torch.cat([is_target, torch.zeros_like(is_target[:, :1])], dim=1)
    return keep, labels[:, 1:][is_target]


@dataclass
class SpringDataCollator:
    """Right-pads features to the longest in the batch: `input_ids` with `pad_token_id`, `labels` with -100, plus an
    `attention_mask`. Position 0 is never a target of a causal LM, so its label is always -100 (this keeps the
    Trainer's token count right whether or not it shifts labels)."""

    pad_token_id: int = 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        labels[:, 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
