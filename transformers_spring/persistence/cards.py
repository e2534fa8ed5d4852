"""Model cards (`README.md` of a saved folder), rendered from the template files in `cards/`."""

from __future__ import annotations

from importlib import resources

CARDS = ("memory", "spring", "continual")


def render_card(name: str, **fields: object) -> str:
    """The card template `cards/<name>.md` with its `{placeholders}` filled in.

    Args:
        name (`str`): `"memory"` (LoGoMemory), `"spring"` (SpringForCausalLM) or `"continual"`
            (ContinualPersonalizer).
        fields: the template's placeholders.
    """
    if name not in CARDS:
        raise ValueError(f"unknown card {name!r}; expected one of {CARDS}.")
    template = resources.files(__package__).joinpath("cards", f"{name}.md").read_text(encoding="utf-8")
    return template.format(**fields)
