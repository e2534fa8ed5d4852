"""Adapter naming and per-row LoRA routing: how a user id becomes an adapter name (`adapter_name_for`) and how each
row of a batch reaches its adapter (peft's `adapter_names` mechanism, with a mutable name list)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch.nn as nn
from transformers.utils import logging

from ..utils.compat import add_adapter_names_hook, find_adapter_layers

logger = logging.get_logger(__name__)

BASE_ADAPTER = "__base__"  # peft's placeholder for "no adapter" in `adapter_names`
PEFT_DEFAULT_ADAPTER = "default"  # peft's default adapter name, saved in the folder's root


def sanitize_adapter_name(name: str) -> str:
    """peft adapter names become module keys, so characters such as '.' or ' ' are replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


DEFAULT_ADAPTER_NAME_TEMPLATE = "{user_id}"


def check_adapter_name_template(template: str, name: str = "adapter_name_template") -> str:
    """Validates an adapter-name template: a short str whose only placeholder is a bare `{user_id}` (no format spec,
    conversion or attribute access: a template read from a saved state is parsed, never formatted with a huge width),
    and whose fixed text is in `[A-Za-z0-9_-]`."""
    if not isinstance(template, str) or len(template) > 256:
        raise ValueError(
            f"`{name}` must be a str of at most 256 characters containing '{{user_id}}', got {template!r}."
        )
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"`{name}` {template!r} is not a valid template: {err}.") from err
    fields = [(field, spec, conversion) for _, field, spec, conversion in parts if field is not None]
    if not fields or any(field != "user_id" or spec or conversion for field, spec, conversion in fields):
        raise ValueError(
            f"`{name}` must contain '{{user_id}}' and no other placeholder or format spec, got {template!r}."
        )
    text = "".join(literal for literal, *_ in parts)
    if text != sanitize_adapter_name(text):
        raise ValueError(f"`{name}` {template!r} holds characters outside [A-Za-z0-9_-].")
    return template


def adapter_name_for(user_id: str, template: str = DEFAULT_ADAPTER_NAME_TEMPLATE) -> str:
    """The adapter name of a user: `template` filled with the user id, whose characters outside `[A-Za-z0-9_-]` are
    replaced by `_` (see [`sanitize_adapter_name`]). The one rule by which a user id becomes an adapter name:
    training, routing, saving, loading and erasure all use it, and [`ContinualPersonalizer`] saves its template
    with its state and hands it to [`SpringForCausalLM`] through `SpringConfig.adapter_name_template`.

    Args:
        user_id (`str`): the user.
        template (`str`, *optional*, defaults to `"{user_id}"`): the naming template.
    """
    name = template.format(user_id=sanitize_adapter_name(user_id))
    if name in (BASE_ADAPTER, PEFT_DEFAULT_ADAPTER):
        # "default" is also reserved: peft saves an adapter of that name in the root of the folder, not in a
        # subfolder, so it could not be offloaded, saved or exported next to the others.
        raise ValueError(f"`user_id` {user_id!r} maps to peft's reserved adapter name {name!r}; use another id.")
    return name


class AdapterRouter:
    """
    Injects a per-row `adapter_names` list into every LoRA layer of a model, like `PeftModel.generate(adapter_names=)`,
    but with a list that can be changed between forwards. The dual-path decoders need that: the history path runs on
    a subset of the rows (rows with a closed gate are skipped), so its forward needs a different list than the main
    forward of the same step.

    Args:
        model (`nn.Module`): a model containing peft LoRA layers (a `PeftModel` or a transformers model with adapters
            loaded through `load_adapter`).
    """

    def __init__(self, model: nn.Module):
        self.layers, self.adapters = find_adapter_layers(model)
        self.names: list[str] | None = None
        self._handles: list = []

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapters)

    def resolve(self, user_id: str | None, template: str = DEFAULT_ADAPTER_NAME_TEMPLATE) -> str:
        """The adapter name of `user_id` by [`adapter_name_for`], or `"__base__"` when the model has no adapter of
        that name (or `user_id` is None)."""
        if user_id is None:
            return BASE_ADAPTER
        try:
            name = adapter_name_for(user_id, template)
        except ValueError:  # a reserved name: no user can have that adapter
            return BASE_ADAPTER
        return name if name in self.adapters else BASE_ADAPTER

    @contextmanager
    def activate(self, names: Sequence[str]) -> Iterator[AdapterRouter]:
        """Registers the hooks with `names` (one per row of the forwards that follow) and removes them on exit."""
        unknown = {name for name in names if name != BASE_ADAPTER} - self.adapters
        if unknown:
            raise ValueError(f"unknown adapter(s) {sorted(unknown)}; the model has {sorted(self.adapters)}.")
        if self._handles:
            raise RuntimeError("AdapterRouter.activate() is not re-entrant; use override() inside it.")
        self.names = list(names)
        self._handles = [add_adapter_names_hook(layer, lambda: self.names) for layer in self.layers]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.names = None

    @contextmanager
    def override(self, names: Sequence[str] | None) -> Iterator[None]:
        """Temporarily uses `names` for the forwards inside the block (no-op when `names` is None or inactive)."""
        if names is None or not self._handles:
            yield
            return
        previous, self.names = self.names, list(names)
        try:
            yield
        finally:
            self.names = previous


def activate_adapters(router: AdapterRouter | None, names: Sequence[str] | None) -> AbstractContextManager:
    """`router.activate(names)`, or a no-op context when there is nothing to route (`router` or `names` is None)."""
    return router.activate(names) if router is not None and names is not None else nullcontext()


def override_adapters(router: AdapterRouter | None, names: Sequence[str] | None) -> AbstractContextManager:
    """`router.override(names)`, or a no-op context when there is no router."""
    return router.override(names) if router is not None else nullcontext()
