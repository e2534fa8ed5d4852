"""`ContinualPersonalizer`: SPRInG updates for many users over time, with bounded resident adapters and persistence."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..generation.config import SPRING_CONFIG_NAME, SpringConfig
from ..generation.model import ADAPTERS_DIR, load_memory_component, save_spring_files, spring_components
from ..memory import LoGoMemory
from ..persistence.cards import render_card
from ..persistence.folder import save_folder
from ..persistence.hub import resolve_folder
from ..persistence.memory_files import ANN_INDEX_FILE, no_ann_cache
from ..records import Interaction, check_user_id
from ..utils.modeling import base_name_or_path, is_peft_model, unwrap_model
from ..version import __version__
from .data import coerce_interactions
from .drift import BaseLogProbCache
from .lora import adapter_name_for, adapter_names
from .sharding import UserShard
from .spring_config import SPRING_FIELDS, SpringTrainingArguments
from .spring_trainer import SpringPeriodOutput, SpringTrainer

logger = logging.get_logger(__name__)

STATE_FILE = "continual_state.json"
ARGS_FILE = "training_args.json"
CACHE_FILE = "base_logprobs.json"
FORMAT_VERSION = 1


class ContinualPersonalizer:
    r"""
    SPRInG for many users over time: call [`~ContinualPersonalizer.observe`] with each user's new interactions, once
    per period; it runs a [`SpringTrainer`] (score → select → train → rebuild the buffer) on that user's adapter and
    counts the user's periods (the first call is period 0, which trains on everything).

    All users share one base model; each has a LoRA adapter in it named after the user (the name
    [`SpringForCausalLM`] routes `personalization=user_id` to). Only `max_resident_adapters` adapters stay loaded
    (least recently used first out): peft's `add_adapter` and `set_adapter` get slower with every adapter loaded, so
    the rest are offloaded to disk and loaded back when their user comes again (a bit-exact safetensors round trip).
    Swapping uses peft's load/delete rather than `hotswap_adapter`, because routing at generation is by adapter name
    and a hot-swapped slot would keep its old name.

    Everything is saved by [`~ContinualPersonalizer.save_pretrained`] (atomically) and resumed by
    [`~ContinualPersonalizer.from_pretrained`]:

    ```
    <dir>/adapters/<user>/adapter_config.json, adapter_model.safetensors   # peft multi-adapter layout
    <dir>/memory/                                                          # LoGoMemory with the residual buffers
    <dir>/continual_state.json                                             # users, adapter names, period counters
    <dir>/training_args.json, base_logprobs.json, spring_config.json, README.md, tokenizer files
    ```

    The directory is also a [`SpringForCausalLM`] checkpoint (`SpringForCausalLM.from_pretrained(dir)` loads every
    adapter and the memory), and one user's adapter loads with
    `PeftModel.from_pretrained(base, f"{dir}/adapters", subfolder=user, adapter_name=user)`.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The base causal LM (it is wrapped with peft at the first user; `personalizer.model` is the wrapped one).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        args ([`SpringTrainingArguments`], *optional*):
            Training and SPRInG settings for every user; defaults to the paper's, with `output_dir` in a temporary
            directory.
        memory (`LoGoMemory`, *optional*):
            Holds the residual buffers. Defaults to a `LoGoMemory(scorer="bm25", gate=None,
            buffer_size=args.buffer_size)` (SPRInG retrieves from the buffer with BM25) with the default encoder.
        spring_config ([`SpringConfig`], *optional*):
            Decoding settings used by [`~ContinualPersonalizer.to_spring_model`] and saved with the state.
        max_resident_adapters (`int`, *optional*, defaults to 8):
            How many user adapters stay loaded in the model.
        offload_dir (`str`, *optional*):
            Where offloaded adapters are kept; a private temporary directory (removed with the object) by default.
        callbacks (`list[TrainerCallback]`, *optional*):
            Passed to every [`SpringTrainer`].
        score_cache ([`BaseLogProbCache`], *optional*):
            Base log-probs already computed.
        shard ([`UserShard`], *optional*):
            Train only this worker's users (see [`claim_user_shard`]): `observe` for another worker's user is a
            logged no-op. Save each worker's state into its own folder and combine them with
            [`~ContinualPersonalizer.merge_shards`].

    Example:

    ```python
    >>> personalizer = ContinualPersonalizer(model, tokenizer, SpringTrainingArguments(output_dir="out"), memory)
    >>> for period in periods:
    ...     for user, items in period.items():
    ...         personalizer.observe(user, items)
    >>> personalizer.save_pretrained("spring-state")
    >>> spring = personalizer.to_spring_model()
    >>> spring.generate(**inputs, personalization="alice")
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        args: SpringTrainingArguments | None = None,
        memory: Any = None,
        *,
        spring_config: SpringConfig | None = None,
        max_resident_adapters: int = 8,
        offload_dir: str | os.PathLike | None = None,
        callbacks: list | None = None,
        score_cache: BaseLogProbCache | None = None,
        shard: UserShard | None = None,
    ):
        if shard is not None and not isinstance(shard, UserShard):
            raise TypeError(f"`shard` must be a UserShard, got {type(shard).__name__}.")
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a causal LM (nn.Module), got {type(model).__name__}.")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be a tokenizer, got {type(tokenizer).__name__}.")
        if isinstance(max_resident_adapters, bool) or not isinstance(max_resident_adapters, int):
            raise TypeError(f"`max_resident_adapters` must be an int, got {type(max_resident_adapters).__name__}.")
        if max_resident_adapters < 1:
            raise ValueError(f"`max_resident_adapters` must be >= 1, got {max_resident_adapters}.")
        if spring_config is not None and not isinstance(spring_config, SpringConfig):
            raise TypeError(f"`spring_config` must be a SpringConfig, got {type(spring_config).__name__}.")
        if offload_dir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="spring-personalizer-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._workdir), True)
        else:
            self._workdir = Path(offload_dir)
            self._workdir.mkdir(parents=True, exist_ok=True)
        if args is None:
            args = SpringTrainingArguments(output_dir=str(self._workdir / "trainer_output"))
        if not isinstance(args, SpringTrainingArguments):
            raise TypeError(f"`args` must be a SpringTrainingArguments, got {type(args).__name__}.")
        if memory is None:
            memory = LoGoMemory(scorer="bm25", gate=None, buffer_size=max(args.buffer_size, 1))
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.memory = memory
        self.spring_config = spring_config
        self.max_resident_adapters = max_resident_adapters
        self.callbacks = callbacks
        self.score_cache = score_cache if score_cache is not None else BaseLogProbCache(base_name_or_path(model))
        self.shard = shard
        self._saved_base_model: str | None = None  # the base model a loaded state says it was trained on
        self._users: dict[str, dict[str, Any]] = {}
        self._resident: OrderedDict[str, bool] = OrderedDict()  # adapter name -> changed since last offloaded
        self._offloaded: dict[str, Path] = {}  # adapter name -> its latest copy on disk
        self._offload_root = self._workdir / "offloaded"
        # Adapters a failed first period left behind (peft cannot delete a model's only adapter); they hold their
        # fresh initial weights again, so the user's next period 0 reuses them.
        self._orphans: set[str] = set()

    # ------------------------------------------------------------------------------------------------ users
    @property
    def users(self) -> list[str]:
        """Users with an adapter, in first-observed order."""
        return list(self._users)

    @property
    def resident_users(self) -> list[str]:
        """Users whose adapter is loaded in the model, least recently used first."""
        by_name = {entry["adapter"]: user for user, entry in self._users.items()}
        return [by_name[name] for name in self._resident if name in by_name]

    def period(self, user_id: str) -> int:
        """The period index the user's next [`~ContinualPersonalizer.observe`] call will run (0 for a new user)."""
        entry = self._users.get(check_user_id(user_id))
        return entry["next_period"] if entry else 0

    def adapter_name(self, user_id: str) -> str:
        """The user's adapter name in `model`. Raises `KeyError` for an unknown user."""
        return self._entry(user_id)["adapter"]

    def _entry(self, user_id: str) -> dict[str, Any]:
        user_id = check_user_id(user_id)
        if user_id not in self._users:
            raise KeyError(f"unknown user {user_id!r}: no period was observed for it (known: {len(self._users)}).")
        return self._users[user_id]

    def state_dict(self, user_id: str) -> dict[str, torch.Tensor]:
        """A copy of the user's adapter weights (peft state-dict keys), loading it from disk when offloaded."""
        from peft import get_peft_model_state_dict

        name = self.load_user(user_id)
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    # ------------------------------------------------------------------------------------------------ periods
    def observe(
        self,
        user_id: str,
        interactions: Sequence[Interaction | dict],
        *,
        eval_interactions: Sequence[Interaction | dict] | None = None,
        **trainer_kwargs,
    ) -> SpringPeriodOutput:
        """Runs the user's next SPRInG period on `interactions` (the period's new training samples).

        Args:
            user_id (`str`): the user; new users start at period 0.
            interactions (`Sequence[Interaction | dict]`): the user's new samples, all with this `user_id`. An empty
                sequence is a logged no-op (the period counter does not move).
            eval_interactions (`Sequence[Interaction | dict]`, *optional*): held-out samples for the trainer.
            trainer_kwargs: passed to [`SpringTrainer`].

        Returns:
            [`SpringPeriodOutput`]. On any error the user's adapter, buffer and period counter are unchanged.
        """
        user_id = check_user_id(user_id)
        records = coerce_interactions(interactions, user_id, "interactions")
        name = adapter_name_for(user_id)
        if self.shard is not None and not self.shard.owns(user_id):
            logger.debug(f"user {user_id!r} belongs to another shard than {self.shard}; not trained here.")
            return SpringPeriodOutput(user_id, self.period(user_id), name, skipped=True)
        entry = self._users.get(user_id)
        clash = next((u for u, e in self._users.items() if e["adapter"] == name and u != user_id), None)
        if clash is not None:
            raise ValueError(
                f"`user_id` {user_id!r} and {clash!r} map to the same adapter name {name!r}; use ids that differ in "
                "[A-Za-z0-9_-] characters."
            )
        if entry is None and name in adapter_names(self.model) and name not in self._orphans:
            raise ValueError(
                f"the model already has an adapter named {name!r} that this personalizer does not manage; "
                f"new user {user_id!r} would overwrite it."
            )
        period = entry["next_period"] if entry else 0
        if not records:
            logger.info(f"user {user_id!r}: empty period; nothing to do (next period stays {period}).")
            return SpringPeriodOutput(user_id, period, name, skipped=True)
        if entry is not None:
            self._make_resident(name)
        callbacks = list(self.callbacks or []) + list(trainer_kwargs.pop("callbacks", None) or [])
        trainer = SpringTrainer(
            model=self.model,
            args=self.args,
            user_id=user_id,
            period=period,
            train_interactions=records,
            memory=self.memory,
            processing_class=self.tokenizer,
            score_cache=self.score_cache,
            adapter_name=name,
            eval_interactions=eval_interactions,
            callbacks=callbacks or None,
            **trainer_kwargs,
        )
        try:
            output = trainer.run_period()
        except BaseException:
            if entry is None and name in adapter_names(trainer.model):
                self._orphans.add(name)
            raise
        finally:
            self.model = trainer.model  # wrapped with peft at the first user
        self._orphans.discard(name)
        self._users[user_id] = {
            "adapter": name,
            "next_period": period + 1,
            "num_observed": (entry["num_observed"] if entry else 0) + len(records),
        }
        self._resident[name] = True
        self._resident.move_to_end(name)
        self._evict(protect=name)
        return output

    def forget_user(self, user_id: str) -> bool:
        """Erases a user everywhere the personalizer keeps them: the adapter (in the model, or its offloaded copy),
        the period counters and routing entry, the base log-prob cache entries and the memory (records, buffer,
        global contributions). The next [`~ContinualPersonalizer.save_pretrained`] writes a folder with none of it
        and removes the files earlier saves wrote for them (the adapter folder included).

        Args:
            user_id (`str`): the user.

        Returns:
            `bool`: whether the user was known (to the personalizer or its memory).
        """
        from ..utils.compat import erase_adapter

        user_id = check_user_id(user_id)
        entry = self._users.pop(user_id, None)
        known = entry is not None
        name = entry["adapter"] if entry else adapter_name_for(user_id)
        if entry is not None or name in self._orphans:
            self._resident.pop(name, None)
            if is_peft_model(self.model) and not erase_adapter(self.model, name):
                self._orphans.add(name)  # peft keeps a model's last adapter: zeroed, reused by the next period 0
            else:
                self._orphans.discard(name)
        offloaded = self._offloaded.pop(name, None)
        if offloaded is not None:
            shutil.rmtree(offloaded, ignore_errors=True)
        self.score_cache.drop_user(user_id)
        forget = getattr(self.memory, "forget_user", None)
        if callable(forget):
            known = bool(forget(user_id)) or known
        return known

    # ------------------------------------------------------------------------------------------------ residency
    def load_user(self, user_id: str) -> str:
        """Makes the user's adapter resident (loading it from disk if offloaded); returns its name."""
        name = self._entry(user_id)["adapter"]
        self._make_resident(name)
        return name

    def _make_resident(self, name: str) -> None:
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
        self._evict(protect=name)

    def _evict(self, protect: str) -> None:
        while len(self._resident) > self.max_resident_adapters:
            victim = next(name for name in self._resident if name != protect)
            if self._resident[victim] or victim not in self._offloaded:
                self._offload_root.mkdir(parents=True, exist_ok=True)
                self.model.save_pretrained(str(self._offload_root), selected_adapters=[victim])
                self._offloaded[victim] = self._offload_root / victim
            self.model.delete_adapter(victim)
            del self._resident[victim]
            logger.debug(f"offloaded adapter {victim!r} to {self._offloaded[victim]}")

    # ------------------------------------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library": "transformers_spring",
            "library_version": __version__,
            "base_model_name_or_path": base_name_or_path(self.model),
            "max_resident_adapters": self.max_resident_adapters,
            "spring_args": self.args.spring_dict(),
            "users": self._users,
            **({"shard": [self.shard.index, self.shard.count]} if self.shard is not None else {}),
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, save_tokenizer: bool = True) -> None:
        """Saves every adapter, the memory, the base log-prob cache, the settings and the per-user period counters.

        Only the files this state's earlier saves wrote (listed in `spring_manifest.json`) are replaced or removed;
        anything else in `save_directory` (logs, checkpoints, notes) is kept, and a file it did not write is never
        overwritten. A crash at any point leaves a folder that the next save or load brings to the newest complete
        version (see [`~persistence.save_folder`]). Under `accelerate launch` only the main process writes.

        Args:
            save_directory (`str` or `os.PathLike`): the target directory.
            save_tokenizer (`bool`, *optional*, defaults to `True`): also save the tokenizer.
        """
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            adopt = lambda d: (d / STATE_FILE).is_file()  # noqa: E731 (a save of an earlier release)
            parts = lambda d: [  # noqa: E731
                *spring_components(d, self.memory),
                {"name": "state", "path": STATE_FILE, "type": "ContinualPersonalizer"},
            ]
            with save_folder(save_directory, "ContinualPersonalizer", adopt=adopt, components=parts) as tmp:
                self._write(tmp, save_tokenizer)
        state.wait_for_everyone()

    def _write(self, directory: Path, save_tokenizer: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        adapters = directory / ADAPTERS_DIR
        adapters.mkdir()
        managed = {entry["adapter"] for entry in self._users.values()}
        resident = [name for name in self._resident if name in managed]
        if resident:
            self.model.save_pretrained(str(adapters), selected_adapters=resident)
            (adapters / "README.md").unlink(missing_ok=True)  # the top-level card describes the whole state
        for name in sorted(managed - set(resident)):
            shutil.copytree(self._offloaded[name], adapters / name)
        config, _ = save_spring_files(
            directory, self.spring_config, self.model, self.memory, self.tokenizer if save_tokenizer else None
        )
        self.score_cache.save(directory / CACHE_FILE)
        # not sort_keys: users stay in first-observed order
        (directory / STATE_FILE).write_text(json.dumps(self._state(), indent=2), encoding="utf-8")
        (directory / ARGS_FILE).write_text(json.dumps(_args_diff(self.args), indent=2, sort_keys=True), "utf-8")
        base = config.base_model_name_or_path
        (directory / "README.md").write_text(
            render_card(
                "continual", base_model_line=f"base_model: {base}\n" if base else "", num_users=len(self._users)
            ),
            encoding="utf-8",
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = True,
        token: str | None = None,
        commit_message: str = "Upload SPRInG personalization state",
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Saves to a temporary directory and uploads it to `repo_id` in one commit (the repo is created if needed,
        private by default: adapters and buffers are derived from users' text).

        Returns:
            The `CommitInfo` of the upload.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "state"
            with no_ann_cache():  # the memory's machine-local ANN cache is never uploaded
                self.save_pretrained(folder)
            return api.upload_folder(
                repo_id=getattr(repo, "repo_id", repo_id),
                folder_path=str(folder),
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
                repo_type="model",
                # The repo mirrors the state: adapters and memory files of users forgotten since the last push go.
                delete_patterns=[f"{ADAPTERS_DIR}/**", "memory/**"],
                ignore_patterns=[f"*{ANN_INDEX_FILE}"],  # the memory's machine-local ANN cache is never uploaded
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | os.PathLike,
        model: torch.nn.Module,
        tokenizer: Any = None,
        args: SpringTrainingArguments | None = None,
        memory: Any = None,
        *,
        memory_kwargs: dict | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs,
    ) -> ContinualPersonalizer:
        """Resumes from a directory (or Hub repo) written by [`~ContinualPersonalizer.save_pretrained`].

        Adapters are loaded lazily: they are copied to the offload directory and loaded into `model` when their user
        is observed again (or by [`~ContinualPersonalizer.load_user`]).

        Args:
            pretrained_name_or_path (`str` or `os.PathLike`): a saved directory or a Hub repo id.
            model (`PreTrainedModel`): the same base model the state was trained on (without the saved adapters).
            tokenizer (*optional*): defaults to the saved tokenizer.
            args ([`SpringTrainingArguments`], *optional*): defaults to the saved ones (training settings included).
            memory (*optional*): defaults to the saved `LoGoMemory` (pass `memory_kwargs={"encoder": ...}` for a
                memory saved with a custom encoder).
            revision, token: Hub options.
            kwargs: passed to the constructor (`max_resident_adapters`, `offload_dir`, `callbacks`, ...).
        """
        directory = resolve_folder(
            pretrained_name_or_path, marker=STATE_FILE, kind="ContinualPersonalizer", revision=revision, token=token
        )
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{STATE_FILE} in {directory} has format_version {state.get('format_version')!r}; this version reads "
                f"{FORMAT_VERSION}."
            )
        users = state.get("users")
        if not isinstance(users, dict):
            raise ValueError(f"{STATE_FILE} in {directory} is missing the field 'users'.")
        if args is None:
            args = _args_from_diff(json.loads((directory / ARGS_FILE).read_text(encoding="utf-8")))
        else:
            saved = state.get("spring_args", {})
            changed = {
                k: (saved[k], getattr(args, k)) for k in SPRING_FIELDS if k in saved and saved[k] != getattr(args, k)
            }
            if changed:
                logger.warning(f"`args` differ from the saved SPRInG settings (saved, given): {changed}.")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if memory is None:
            memory = load_memory_component(directory, memory_kwargs)
        spring_config = kwargs.pop("spring_config", None)
        if spring_config is None and (directory / SPRING_CONFIG_NAME).is_file():
            spring_config = SpringConfig.from_pretrained(directory)
        cache = None
        if (directory / CACHE_FILE).is_file():
            cache = BaseLogProbCache.load(directory / CACHE_FILE, model_name=base_name_or_path(model))
        kwargs.setdefault("max_resident_adapters", state.get("max_resident_adapters", 8))
        if "shard" in state and "shard" not in kwargs:  # a worker's save resumes as that worker
            shard = state["shard"]
            if not (isinstance(shard, list) and len(shard) == 2):
                raise ValueError(f"{STATE_FILE} in {directory}: field 'shard' must be [index, count], got {shard!r}.")
            try:
                kwargs["shard"] = UserShard(*shard)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{STATE_FILE} in {directory}: field 'shard': {err}") from None
        personalizer = cls(model, tokenizer, args, memory, spring_config=spring_config, score_cache=cache, **kwargs)
        personalizer._saved_base_model = state.get("base_model_name_or_path")
        present = set(adapter_names(model))
        root = personalizer._offload_root
        root.mkdir(parents=True, exist_ok=True)
        entries = _checked_users(users, directory / STATE_FILE)  # every name that becomes a path, checked first
        for user_id, entry in entries.items():
            name = entry["adapter"]
            source = directory / ADAPTERS_DIR / name
            if not (source / "adapter_config.json").is_file() or source.is_symlink():
                raise ValueError(f"{STATE_FILE}: user {user_id!r} has no saved adapter ({name!r}) in {directory}.")
            if name in present:
                raise ValueError(f"`model` already has an adapter named {name!r}; pass the plain base model.")
            # A private copy: the saved directory may be overwritten later (e.g. by saving back to it).
            shutil.copytree(source, root / name, dirs_exist_ok=True)
            personalizer._offloaded[name] = root / name
            personalizer._users[user_id] = entry
        return personalizer

    def export_for_serving(
        self,
        directory: str | os.PathLike,
        *,
        users: Sequence[str] | None = None,
        max_lora_rank: int = 16,
    ) -> dict[str, Any]:
        """Writes the users' adapters for a multi-LoRA serving engine (vLLM, S-LoRA, LoRAX): one plain peft folder
        per user plus `serving_manifest.json` (user → `lora_name`, `lora_int_id`, `path`, `rank`, weights'
        `sha256`). Every folder is checked against vLLM's LoRA rules before anything is committed (see
        [`~persistence.serving.vllm_lora_problems`]); the save is atomic and keeps files it did not write, like
        [`~ContinualPersonalizer.save_pretrained`]. Memories and buffers are not exported: a server serves λ = 0
        (the adapter alone) or λ = 1 (adapter plus retrieved history in the prompt), see `docs/serving.md`.

        Args:
            directory (`str` or `os.PathLike`): the export folder.
            users (`Sequence[str]`, *optional*): whose adapters to export (default: every user, first observed
                first).
            max_lora_rank (`int`, *optional*, defaults to 16): the server's `--max-lora-rank` (vLLM's default); one of
                vLLM's allowed values.

        Returns:
            `dict`: the manifest written (empty on the other processes of a distributed run: only the main one
            writes).

        Raises:
            `KeyError`: an unknown user. `ValueError`: an adapter vLLM would refuse (the field is named).

        `lora_int_id`s are vLLM's cache keys, so they are never reused: exporting again into the same folder keeps
        a user's id while their weights are unchanged, and gives new weights (or a new user) a new id; the ids that
        left are listed in `retired_lora_int_ids`. A server never serves an old or forgotten user's cached adapter
        under a reused id.
        """
        import hashlib

        from accelerate import PartialState
        from peft import get_peft_model_state_dict

        from ..persistence.serving import (
            ADAPTER_WEIGHTS,
            VLLM_NO_LORA_MODEL_TYPES,
            assign_lora_int_ids,
            check_max_lora_rank,
            check_vllm_lora,
            lora_rank,
            previous_serving_ids,
            write_adapter_folder,
            write_serving_manifest,
        )

        max_lora_rank = check_max_lora_rank(max_lora_rank)
        if isinstance(users, str):
            raise TypeError("`users` must be a sequence of user ids, not one string.")
        chosen = list(dict.fromkeys(check_user_id(u) for u in (self.users if users is None else users)))
        names = {user: self.adapter_name(user) for user in chosen}  # KeyError for an unknown user, before writing
        model_type = getattr(getattr(unwrap_model(self.model), "config", None), "model_type", None)
        if model_type in VLLM_NO_LORA_MODEL_TYPES:
            logger.warning(
                f"vLLM's {model_type} model class does not support LoRA: these adapters load with peft, S-LoRA or "
                "LoRAX, but not in vLLM."
            )
        manifest: dict[str, Any] = {}
        state = PartialState()
        if state.is_main_process:
            previous = previous_serving_ids(directory)
            with save_folder(directory, "ServingExport", argument="directory") as tmp:
                entries = []
                for user in chosen:
                    name = names[user]
                    folder = tmp / name
                    if name in self._resident:
                        weights = get_peft_model_state_dict(self.model, adapter_name=name)
                        write_adapter_folder(folder, self.model.peft_config[name], weights)
                    else:  # offloaded: the two files peft wrote, copied bit for bit (nothing else, no symlink)
                        folder.mkdir()
                        for file in ("adapter_config.json", ADAPTER_WEIGHTS):
                            source = self._offloaded[name] / file
                            if source.is_symlink() or not source.is_file():
                                raise ValueError(f"the offloaded adapter of {user!r} has no regular file {file}.")
                            shutil.copyfile(source, folder / file)
                    check_vllm_lora(folder, max_lora_rank)
                    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
                    digest = hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
                    entries.append(
                        {"user_id": user, "lora_name": name, "path": name, "rank": lora_rank(config), "sha256": digest}
                    )
                assign_lora_int_ids(entries, previous)
                manifest = write_serving_manifest(
                    tmp, entries, base_name_or_path(self.model), max_lora_rank, retired=previous.retired(entries)
                )
        state.wait_for_everyone()
        return manifest

    @classmethod
    def merge_shards(
        cls,
        shard_directories: Sequence[str | os.PathLike],
        save_directory: str | os.PathLike,
        model: torch.nn.Module,
        *,
        memory_kwargs: dict | None = None,
        **kwargs,
    ) -> ContinualPersonalizer:
        """Combines the states that sharded workers saved (each with `shard=`, see [`claim_user_shard`]) into one
        state in `save_directory`, and returns it: every user's adapter (a bit-exact copy), period counters, memory
        records and buffer ([`LoGoMemory.merge`]) and base log-probs. The result is the state a single process that
        trained every user would have saved.

        Args:
            shard_directories (`Sequence[str | os.PathLike]`): the workers' saved folders.
            save_directory (`str` or `os.PathLike`): where the merged state is saved.
            model (`PreTrainedModel`): the base model (without adapters).
            memory_kwargs (`dict`, *optional*): passed to each shard's memory load (e.g. `{"encoder": ...}`).
            kwargs: passed to the merged personalizer's constructor (`max_resident_adapters`, `offload_dir`, ...).

        Returns:
            [`ContinualPersonalizer`]: the merged state (also saved). Its adapters, period counters, base log-probs,
            histories and buffers equal those of one process that trained every user; users are listed shard by
            shard (so a later `export_for_serving` numbers them in that order).

        Raises:
            `ValueError`: a user in two shards; a missing shard (each worker's save records its shard `index` of
            `count`); shards trained with other SPRInG settings or on another base model; some shards with a memory
            and some without. Nothing is written then.
        """
        shards = [
            cls.from_pretrained(directory, model, memory_kwargs=memory_kwargs) for directory in shard_directories
        ]
        if not shards:
            raise ValueError("`shard_directories` is empty.")
        first = shards[0]
        recorded = [shard.shard for shard in shards]
        if any(r is not None for r in recorded):
            counts = {r.count if r is not None else None for r in recorded}
            indices = sorted(r.index for r in recorded if r is not None)
            if len(counts) != 1 or None in counts or indices != list(range(next(iter(counts)))):
                found = [(r.index, r.count) if r is not None else None for r in recorded]
                raise ValueError(
                    f"the shards' saved (index, count) are {found}: pass every worker's folder, each once."
                )
        base = base_name_or_path(model)
        owner: dict[str, int] = {}
        for i, shard in enumerate(shards):
            if shard.args.spring_dict() != first.args.spring_dict():
                raise ValueError(f"shard {i} ({shard_directories[i]}) was trained with other SPRInG settings.")
            saved = shard._saved_base_model
            if saved and base and saved != base:
                raise ValueError(f"shard {i} ({shard_directories[i]}) was trained on {saved!r}, not on {base!r}.")
            for user in shard.users:
                if user in owner:
                    raise ValueError(
                        f"user {user!r} is in shard {owner[user]} and shard {i}; shards must be disjoint."
                    )
                owner[user] = i
        memories = [s.memory for s in shards]
        if any(m is None for m in memories) and any(m is not None for m in memories):
            raise ValueError("some shards have a memory and some do not; their buffers cannot be merged.")
        memory = LoGoMemory.merge(memories) if memories[0] is not None else None
        cache = BaseLogProbCache(first.score_cache.model_name)
        for shard in shards:
            for key in shard.score_cache.keys():
                cache.put(key, shard.score_cache.get(key))
        kwargs.setdefault("max_resident_adapters", first.max_resident_adapters)
        merged = cls(
            model, first.tokenizer, first.args, memory, spring_config=first.spring_config, score_cache=cache, **kwargs
        )
        root = merged._offload_root
        root.mkdir(parents=True, exist_ok=True)
        for shard in shards:
            for user, entry in shard._users.items():
                shutil.copytree(shard._offloaded[entry["adapter"]], root / entry["adapter"], dirs_exist_ok=True)
                merged._offloaded[entry["adapter"]] = root / entry["adapter"]
                merged._users[user] = dict(entry)
        merged.save_pretrained(save_directory)
        return merged

    # ------------------------------------------------------------------------------------------------ inference
    def to_spring_model(self, spring_config: SpringConfig | None = None, users: Sequence[str] | None = None):
        """A [`SpringForCausalLM`] over the shared model and memory, for `generate(..., personalization=user)`.

        Args:
            spring_config ([`SpringConfig`], *optional*): decoding settings (default: the personalizer's, else the
                paper's).
            users (`Sequence[str]`, *optional*): users whose adapters must be loaded (default: every user when they
                fit in `max_resident_adapters`, else the resident ones). Users whose adapter is not loaded decode with
                the base model.

        Note: rows without `personalization` use the model's active adapter (the last one trained or loaded), as
        `PeftModel.generate` does; wrap calls in `model.disable_adapter()` for the plain base model.
        """
        from ..generation import SpringForCausalLM

        if users is None:
            users = self.users if len(self._users) <= self.max_resident_adapters else []
            if len(self._users) > self.max_resident_adapters:
                logger.warning(
                    f"{len(self._users)} users but only {self.max_resident_adapters} resident adapters; pass `users=` "
                    "to choose whose adapters to load (others decode with the base model)."
                )
        users = list(users)
        if len(users) > self.max_resident_adapters:
            raise ValueError(f"`users` has {len(users)} users; at most `max_resident_adapters` = "
                             f"{self.max_resident_adapters} can be loaded.")  # fmt: skip
        for user in users:
            self.load_user(user)
        self.model.eval()
        config = spring_config or self.spring_config or SpringConfig()
        return SpringForCausalLM(self.model, memory=self.memory, config=config, tokenizer=self.tokenizer)


# ---------------------------------------------------------------------------------------------------- helpers
def _checked_users(users: dict, path: Path) -> dict[str, dict[str, Any]]:
    """`continual_state.json`'s `users`, validated: real user ids, each with the adapter name the library derives
    from it (a name from a file becomes a path, so `"../../x"` is refused), and non-negative int counters."""
    checked = {}
    for user_id, entry in users.items():
        try:
            user_id = check_user_id(user_id)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: field 'users' holds an invalid user id: {err}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: field 'users.{user_id}' must be an object, got {type(entry).__name__}.")
        name = entry.get("adapter")
        if name != adapter_name_for(user_id):
            raise ValueError(
                f"{path}: field 'users.{user_id}.adapter' is {name!r}, but the adapter of user {user_id!r} is "
                f"{adapter_name_for(user_id)!r}."
            )
        counters = {}
        for key in ("next_period", "num_observed"):
            value = entry.get(key, 0 if key == "num_observed" else None)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
                raise ValueError(f"{path}: field 'users.{user_id}.{key}' must be a non-negative int, got {value!r}.")
            counters[key] = value
        checked[user_id] = {"adapter": name, **counters}
    return checked


_SECRET_FIELDS = ("hub_token", "push_to_hub_token")


def _args_diff(args: SpringTrainingArguments) -> dict[str, Any]:
    """The fields of `args` that differ from their declared defaults (secrets excluded). The defaults are read from
    the dataclass fields: building a second `TrainingArguments` would re-initialise accelerate's process state, which
    breaks a distributed run."""
    current = args.to_dict()
    diff = {}
    for f in dataclasses.fields(SpringTrainingArguments):
        if not f.init or f.name in _SECRET_FIELDS or f.name not in current:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        default = getattr(default, "value", default)  # enums are saved as their values
        if current[f.name] != default or f.name == "output_dir":
            diff[f.name] = current[f.name]
    return diff


def _args_from_diff(data: dict[str, Any]) -> SpringTrainingArguments:
    init_fields = {f.name for f in dataclasses.fields(SpringTrainingArguments) if f.init}
    unknown = sorted(set(data) - init_fields)
    if unknown:
        logger.warning(f"{ARGS_FILE}: ignoring unknown field(s) {unknown}.")
    return SpringTrainingArguments(**{k: v for k, v in data.items() if k in init_fields})
