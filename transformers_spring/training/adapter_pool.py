"""`AdapterPool`: the per-user LoRA adapters of one shared model, at most `max_resident` of them loaded (least
recently used out) and the rest offloaded to disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.utils import logging

from ..persistence.safe_copy import UnsafeFolderError
from ..utils.modeling import is_peft_model

logger = logging.get_logger(__name__)


class AdapterPool:
    r"""
    The adapters of one model, bounded in how many stay loaded: peft's `add_adapter` and `set_adapter` get slower
    with every adapter loaded, so beyond `max_resident` the least recently used one is saved to `offload_dir` (only
    when it changed since its last copy) and deleted from the model, and loaded back when needed (a bit-exact
    safetensors round trip). Swapping uses peft's load/delete rather than `hotswap_adapter`, because routing at
    generation is by adapter name and a hot-swapped slot would keep its old name.

    The pool holds the model: [`~AdapterPool.make_resident`] wraps a plain model with peft, so read `pool.model`
    after it (and assign it after anything else wraps the model).

    Args:
        model (`nn.Module`): the shared model (a `PeftModel`, or a plain model wrapped at the first load).
        max_resident (`int`): how many pool adapters stay loaded.
        offload_dir (`str` or `os.PathLike`): where offloaded copies are kept (one peft folder per adapter).
    """

    def __init__(self, model: torch.nn.Module, max_resident: int, offload_dir: str | os.PathLike):
        self.model = model
        self.max_resident = max_resident
        self.offload_dir = Path(offload_dir)
        self._resident: OrderedDict[str, bool] = OrderedDict()  # name -> changed since its last offloaded copy
        self._offloaded: dict[str, Path] = {}  # name -> its latest copy on disk
        # Adapters a failed first period left behind (peft cannot delete a model's only adapter); they hold their
        # fresh initial weights again, so the next period 0 of their user reuses them.
        self._orphans: set[str] = set()

    @property
    def resident(self) -> list[str]:
        """The loaded pool adapters, least recently used first."""
        return list(self._resident)

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def __contains__(self, name: str) -> bool:
        """Whether the pool holds adapter `name` (loaded or offloaded)."""
        return name in self._resident or name in self._offloaded

    def owns(self, name: str) -> bool:
        """Whether the model's adapter `name`, if any, is the pool's (held, or left behind by a failed first
        training, see [`~AdapterPool.mark_failed`])."""
        return name in self or name in self._orphans

    def add_offloaded(
        self, name: str, path: str | os.PathLike, *, allowed_targets: Sequence[str] | str | None = None
    ) -> Path:
        """Adds adapter `name` from the peft folder `path`, a folder the library may not have written; it loads when
        first needed. `path` is copied (it may be overwritten later, e.g. by saving back to it) into a staging folder
        without following any link, the copy is checked with
        [`~persistence.adapter_checks.check_adapter_folder`] against the pool's model, and only then moved into
        `offload_dir`: a refused folder leaves nothing behind. What [`~AdapterPool.make_resident`] loads later is
        this checked copy.

        Args:
            name (`str`): the adapter's name.
            path (`str` or `os.PathLike`): its peft folder.
            allowed_targets (`Sequence[str]` or `str`, *optional*): the `target_modules` the adapter may have.

        Returns:
            `Path`: the copy's path.

        Raises:
            `ValueError`: a symlink in `path`, or an adapter the checks refuse (the file and field are named).
        """
        from ..persistence.adapter_checks import check_adapter_folder, copy_adapter_folder

        target = self.offload_dir / name
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.offload_dir))
        try:
            copy = copy_adapter_folder(path, staging / name, what=f"the adapter folder of {name!r}")
            # The copy is what is checked and loaded: the source cannot change between the check and the load.
            check_adapter_folder(copy, base_model=self.model, allowed_targets=allowed_targets, where=path)
            self._check_target(target)
            if target.exists():
                shutil.rmtree(target)  # a stale copy from an earlier use of this offload directory
            os.replace(copy, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._offloaded[name] = target
        return target

    def _check_target(self, target: Path) -> None:
        # peft's save writes through a symlinked folder: an offload must never land outside `offload_dir`.
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise UnsafeFolderError(f"{target} in the offload directory is a symlink or not a folder.")

    def path_of(self, name: str) -> Path:
        """A peft folder holding adapter `name`'s current weights: its offloaded copy, refreshed first when the
        loaded adapter changed since. Raises `KeyError` for an adapter the pool does not hold."""
        if name in self._resident and (self._resident[name] or name not in self._offloaded):
            self._offload(name)
        if name not in self._offloaded:
            raise KeyError(f"adapter {name!r} is neither loaded nor offloaded.")
        return self._offloaded[name]

    def mark_trained(self, name: str) -> None:
        """Records that adapter `name` is loaded in the model and was just changed (trained): it becomes the most
        recently used, and the least recently used ones are offloaded beyond `max_resident`."""
        self._orphans.discard(name)
        self._resident[name] = True
        self._resident.move_to_end(name)
        self.evict(protect=name)

    def mark_failed(self, name: str) -> None:
        """Records that a failed first training left adapter `name` in the model (peft cannot delete a model's only
        adapter); it is not held, but [`~AdapterPool.owns`] it, so that its user's next first training reuses it."""
        self._orphans.add(name)

    def make_resident(self, name: str) -> None:
        """Loads adapter `name` (trainable) unless it is loaded, and makes it the most recently used."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        path = self._offloaded.get(name)
        if path is None:
            raise KeyError(f"adapter {name!r} is neither loaded nor offloaded.")
        if is_peft_model(self.model):
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=True)
        else:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=True)
        self.model.set_adapter(name)  # never leave a soon-evicted adapter active
        self._resident[name] = False
        self.evict(protect=name)

    def evict(self, protect: str | None = None) -> None:
        """Offloads the least recently used adapters (never `protect`) until at most `max_resident` are loaded."""
        while len(self._resident) > self.max_resident:
            victim = next(name for name in self._resident if name != protect)
            if self._resident[victim] or victim not in self._offloaded:
                self._offload(victim)
            self.model.delete_adapter(victim)
            del self._resident[victim]
            logger.debug(f"offloaded adapter {victim!r} to {self._offloaded[victim]}")

    def remove(self, name: str) -> None:
        """Erases adapter `name`: from the model (peft keeps a model's last adapter: it is zeroed instead, and
        reused by the next first training of that name) and its offloaded copy."""
        from ..utils.compat import erase_adapter

        if name in self._resident or name in self._orphans:
            self._resident.pop(name, None)
            if is_peft_model(self.model) and not erase_adapter(self.model, name):
                self._orphans.add(name)
            else:
                self._orphans.discard(name)
        offloaded = self._offloaded.pop(name, None)
        if offloaded is not None:
            shutil.rmtree(offloaded, ignore_errors=True)

    def _offload(self, name: str) -> None:
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        self._check_target(self.offload_dir / name)
        self.model.save_pretrained(str(self.offload_dir), selected_adapters=[name])
        self._offloaded[name] = self.offload_dir / name
        self._resident[name] = False
