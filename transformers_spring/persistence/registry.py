"""Saved class names: a folder records the qualified class of what it holds (a memory, a mediator) and a load
dispatches on it, so a subclass comes back as itself."""

from __future__ import annotations


def qualified_name(cls: type) -> str:
    """`module.QualName`, as manifests and configs record a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


class ClassRegistry:
    """The subclasses of one base class by qualified name (a base registers its subclasses from
    `__init_subclass__`).

    Args:
        base (`type`): the base class; its bare name (what older saves wrote) also resolves to it.
        hint (`str`): the keyword a caller can pass instead of loading the class, for the error message.
    """

    def __init__(self, base: type, hint: str):
        self.base, self.hint = base, hint
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> None:
        self._classes[qualified_name(cls)] = cls

    def resolve(self, name: str) -> type:
        """The class saved under `name`.

        Raises:
            `ValueError`: no such class is registered (its module was not imported, or it no longer exists).
        """
        if name in (self.base.__name__, qualified_name(self.base)):
            return self.base
        if name in self._classes:
            return self._classes[name]
        raise ValueError(
            f"the folder was saved with the {self.base.__name__} class {name!r}, which is not registered: import the "
            f"module that defines it before loading, or pass `{self.hint}=`."
        )
