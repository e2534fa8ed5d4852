"""Rendering retrieved history and inserting it into an already tokenized (possibly chat-formatted) prompt."""

from __future__ import annotations

from collections.abc import Sequence

from transformers.utils import logging

from ..records import Interaction, RetrievedItem
from .config import SpringConfig

logger = logging.get_logger(__name__)

# A private-use character string that no chat template or tokenizer produces on its own.
_SENTINEL = "\ue000SPRING_CONTENT\ue000"


def _find_last(sequence: Sequence[int], pattern: Sequence[int], end: int | None = None) -> int:
    """Start index of the last occurrence of `pattern` in `sequence[:end]`, or -1."""
    n, m = len(sequence) if end is None else end, len(pattern)
    if m == 0:
        return -1
    for start in range(n - m, -1, -1):
        if list(sequence[start : start + m]) == list(pattern):
            return start
    return -1


def render_item(item: RetrievedItem | Interaction | str, template: str) -> str:
    """Renders one history item with `template` (`{prompt}`, `{response}`, `{text}`, `{user_id}`, `{source}`,
    `{score}`); plain strings are used as they are."""
    if isinstance(item, str):
        return item
    score, source = None, "local"
    if isinstance(item, RetrievedItem):
        score, source, item = item.score, item.source, item.interaction
    if not isinstance(item, Interaction):
        raise TypeError(f"a history item must be a RetrievedItem, an Interaction or a str, got {type(item).__name__}.")
    return template.format(
        prompt=item.prompt,
        response=item.response,
        text=item.text,
        user_id=item.user_id,
        source=source,
        score=float("nan") if score is None else score,
    )


class HistoryPromptBuilder:
    """
    Builds each row's history-conditioned input from its prompt tokens: renders the retrieved items with the
    [`SpringConfig`] templates under the `max_history_tokens` budget and inserts the block at the start of the prompt
    content.

    With a chat template (`chat_insertion="auto"`), the block goes at the start of the **last user message's
    content**, found by searching the tokens of that turn's header (e.g. `<|im_start|>user\n` for ChatML,
    `<|start_header_id|>user<|end_header_id|>\n\n` for Llama 3), so the system prompt, turn markers and generation
    prompt stay where the model was trained to see them. Without a chat template, or when the header is not found,
    it goes at the start of the prompt, after a leading BOS token.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        config ([`SpringConfig`]): templates, budget and insertion mode.
    """

    def __init__(self, tokenizer, config: SpringConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.user_header_ids: list[int] | None = None
        self.generation_suffix: str | None = None
        if config.chat_insertion == "auto" and getattr(tokenizer, "chat_template", None):
            self._learn_chat_layout()

    def _learn_chat_layout(self) -> None:
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
            with_prompt = tok.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # a template that needs other roles or arguments: fall back to prefix insertion
            logger.warning(f"Could not render the chat template ({err}); history goes before the prompt instead.")
            return
        if _SENTINEL not in text:
            return
        prefix = text[: text.index(_SENTINEL)]
        self.generation_suffix = with_prompt[with_prompt.index(_SENTINEL) + len(_SENTINEL) :]
        specials = sorted({s for s in tok.all_special_tokens if s} | self._added_special_tokens(), key=len)
        # The header is the last user turn's opening: from the last special token before the role word to the end.
        anchor = prefix.rfind("user")
        if anchor < 0:
            anchor = len(prefix)
        start = max((prefix.rfind(s, 0, anchor) for s in specials), default=-1)
        header = prefix[start:] if start >= 0 else ""
        if header:
            self.user_header_ids = tok(header, add_special_tokens=False)["input_ids"]

    def _added_special_tokens(self) -> set[str]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return {token.content for token in decoder.values() if getattr(token, "special", False)}

    # ------------------------------------------------------------------------------------------------ positions
    def insertion_index(self, ids: Sequence[int]) -> int:
        """Where the history block goes in an unpadded row of prompt ids."""
        if self.user_header_ids:
            start = _find_last(ids, self.user_header_ids)
            if start >= 0:
                return start + len(self.user_header_ids)
        bos = self.tokenizer.bos_token_id
        return 1 if len(ids) and bos is not None and ids[0] == bos else 0

    def query_text(self, ids: Sequence[int]) -> str:
        """The retrieval query of a row: its prompt content, without chat markers and generation prompt."""
        content = list(ids[self.insertion_index(ids) :])
        text = self.tokenizer.decode(content, skip_special_tokens=False)
        suffix = (self.generation_suffix or "").strip()  # decoding may not reproduce the template's whitespace
        if suffix and suffix in text:
            return text[: text.rindex(suffix)].strip()
        return self.tokenizer.decode(content, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------------------------ rendering
    def history_block_ids(self, items: Sequence[RetrievedItem | Interaction | str]) -> list[int]:
        """Token ids of the rendered history block (empty when there are no items), within the token budget."""
        if not items:
            return []
        cfg, tok = self.config, self.tokenizer
        budget = cfg.max_history_tokens
        rendered = [render_item(item, cfg.history_item_template) for item in items]

        def encode(texts: list[str]) -> list[int]:
            block = cfg.retrieval_template.format(history=cfg.history_separator.join(texts))
            return tok(block, add_special_tokens=False)["input_ids"]

        kept: list[str] = []
        ids: list[int] = []
        for text in rendered:
            candidate = encode(kept + [text])
            if len(candidate) > budget:
                break
            kept, ids = kept + [text], candidate
        if not kept:
            # The most relevant item alone is too long: keep its beginning.
            overhead = len(encode([""]))
            room = budget - overhead
            if room <= 0:
                logger.warning("`max_history_tokens` is smaller than the retrieval template; no history is used.")
                return []
            head = tok(rendered[0], add_special_tokens=False)["input_ids"][:room]
            ids = encode([tok.decode(head)])[:budget]
        if len(kept) < len(rendered):
            logger.info(f"History budget: kept {len(kept)} of {len(rendered)} item(s) ({budget} tokens).")
        return ids

    def build(self, ids: Sequence[int], items: Sequence[RetrievedItem | Interaction | str]) -> list[int]:
        """The history-conditioned input of one unpadded row (`ids` unchanged when the block is empty)."""
        block = self.history_block_ids(items)
        ids = list(ids)
        if not block:
            return ids
        at = self.insertion_index(ids)
        return ids[:at] + block + ids[at:]
