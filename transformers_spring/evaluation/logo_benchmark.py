"""The LoGo study: does collective knowledge help cold-start users and users with a skewed history, over local-only
SPRInG, under a stated sharing policy: retrieval from consenting users' items, community adapters trained under the
private policy, or both, with mediators fitted on validation queries only?"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..generation import Personalization
from ..generation.adapters import BASE_ADAPTER
from ..generation.logits_process import mix_logprobs
from ..memory.gate import RelevanceGate
from ..memory.mediator import CalibratedMediator, MediatorExample
from ..records import Interaction, is_testable
from .benchmark import ContinualBenchmark
from .checkpoint import fingerprint, load_checkpoint, save_checkpoint, split_identity
from .data import benchmark_splits
from .decoding import BenchmarkRow, history_key
from .logo_benchmark_config import LOGO_ARMS, LoGoBenchmarkArguments
from .metrics import rouge_scores
from .report import save_logo_results

logger = logging.get_logger(__name__)

LOCAL = "spring-local"
LOGO_CHECKPOINT = "logo_checkpoint.json"  # (not `spring bench`'s checkpoint.json: the two may share an --out)
LOGO_COMMUNITIES = "logo_communities"  # the community adapters of a checkpointed run, next to its checkpoint
CONSENTED, COMMUNITY, BOTH = LOGO_ARMS["consented"], LOGO_ARMS["community"], LOGO_ARMS["both"]
MEDIATED = (CONSENTED, BOTH)  # the arms whose context a fitted mediator builds from local and global hits
# Which adapter each arm decodes with: the user's own ("local") or the one started from their community's.
ADAPTER_KIND = {LOCAL: "local", CONSENTED: "local", COMMUNITY: "community", BOTH: "community"}


class _CachedEncoder:
    """An encoder that remembers what it embedded: the study writes a user's items again after every history cut."""

    def __init__(self, encoder):
        self.encoder, self.name, self.dim = encoder, encoder.name, encoder.dim
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, vector in zip(missing, np.asarray(self.encoder.encode(missing)), strict=True):
                self._cache[text] = vector
        return np.stack([self._cache[t] for t in texts]) if texts else np.empty((0, self.dim), dtype=np.float32)


def _mixture_nll(log_par: torch.Tensor, log_ret: torch.Tensor | None, weight: float) -> float:
    """Mean per-token NLL under SPRInG's mixture ([`mix_logprobs`], the one implementation decoding and `score`
    use): the parametric path alone without a context or at λ = 0."""
    return float(-mix_logprobs(log_ret, log_par, weight).mean())


class LoGoBenchmark(ContinualBenchmark):
    r"""
    The LoGo study on the benchmark's users, splits, model and decoding, under a stated sharing policy.

    - **History cuts.** Each user's test items (the held-out split of every period from 1 on, as in the benchmark)
      are evaluated with the user's history cut to their first `m` training items, for every `m` of `history_cuts`.
      A cut user's SPRInG is what SPRInG would be with only those items: an adapter trained on them (none for
      `m = 0`) and a local memory and residual buffer holding only them. "all" is the full SPRInG chain (period 0,
      then the period updates), each period's test items decoded after that period's update with the history up to
      it. **The other users' memories stay whole.** Global items are read with `before=<the item's date>`.
    - **Sharing policy.** The memory is a `LoGoMemory(sharing_policy="consented")` in which every user opted in:
      news headlines are published text. The consented arms serve other users' items verbatim; no arm serves a
      private item.
    - **Community adapters, cross-fitted.** The users are split in two folds (alternating in the benchmark's user
      order). For each fold, [`ContinualPersonalizer.train_community_adapters`] trains community adapters on the
      *other* fold's users (their whole training streams, the default private policy), so no user's own items are
      in the community adapter they use. A cut user's community adapter is the one nearest the mean embedding of
      their cut items; with none (`m = 0`), the one nearest each query. The community arms' adapter is trained on the
      same items as the local one, started from that community adapter (`m = 0`: the community adapter itself), and
      reads the same local hits (the local adapter's residual buffer), so it differs from local-only SPRInG by the
      adapter alone. Other users' items are not filtered by date in the community adapters: a limitation the
      retrieval path does not have.
    - **Gate σ, frozen before any validation or test query**: the `gate_quantile` of the residual-buffer BM25 scores
      of every user's period-0 training queries (each query's own entry excluded).
    - **Arms.** `spring-local`: SPRInG's buffer hits behind the gate, λ = `interpolation_weight`, the local adapter.
      `spring-logo-consented`: the same local hits and the consenting users' global hits, mediated by a
      [`CalibratedMediator`] fitted on validation queries, the local adapter. `spring-community`: local-only SPRInG
      on the community-started adapter. `spring-community-consented`: both, with its own fitted mediator.
    - **Validation, never test, on every kind of user.** Two folds per user, from two periods:
      - *early*: the latest `validation_fraction` of the period-0 training split, each item scored under every
        history cut that does not contain it (the "all" cut is an adapter on the rest of period 0);
      - *late* (with two periods or more): the latest `validation_fraction` of the last period's training split,
        scored with the whole training stream before it as the history and an adapter trained on it, so that warm
        users (the test's "all" cut, dozens of items) are in the fit, not only the cold ones.
      Every row is scored for every context split (`global_slots` of `spring_k`) and λ of `mediator_weights`. The
      mediators are fitted on these tables before any test item is decoded, and keep a cell's local decision unless
      the validation gain clears its bound (see [`CalibratedMediator.fit`]).
    - **Buckets.** Cold start: `m <= 5`; warm: "all". Bias: at "all", test items whose topic (`category_field`)
      is under `bias_rare_share` of the user's training items so far while the user's top topic holds at least
      `bias_dominant_share` of them.
    - **Checkpoint.** With `checkpoint=`, the state is saved after the selection, after σ, after every user's
      validation and after every user's test pass; a rerun with the same settings, model and data continues after
      the last finished user. The community adapters are saved next to the checkpoint (`logo_communities/`) and
      loaded back; the fitted validation adapters of unfinished users are trained again (deterministic). Without a
      quantile gate each user's fit is trained right before their validation, so no finished user's work is lost.

    Args:
        args ([`LoGoBenchmarkArguments`]): the settings.
        model, tokenizer, interactions: as for [`ContinualBenchmark`].
    """

    def __init__(self, args: LoGoBenchmarkArguments, model=None, tokenizer=None, interactions=None):
        if not isinstance(args, LoGoBenchmarkArguments):
            raise TypeError(f"`args` must be LoGoBenchmarkArguments, got {type(args).__name__}.")
        super().__init__(args, model, tokenizer, interactions)
        self.methods = []  # the study's arms are its own (`LOCAL` and `LOGO_ARMS`), not benchmark methods

    # ------------------------------------------------------------------------------------------------ run
    def run(self, progress: bool = True, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
        """Runs the selection, the community adapters, the validation pass, fits the mediators, then the test pass.
        Returns `config`, `selection`, `arms`, `mediators` (each mediated arm's fitted rules and cell counts),
        `communities` (per fold: each community adapter's size), `validation` (counts and ids), `users`, `records`
        (one per test item, cut and arm), `summary` (see [`summarize_logo`]) and `timing_s`.

        Args:
            progress (`bool`, *optional*, defaults to `True`): tqdm bars.
            checkpoint (`str` or `os.PathLike`, *optional*): a JSON file saved along the way (see the class
                docstring); an existing one made with the same settings, model and data is continued.
        """
        from .report import summarize_logo

        args = self.args
        started = time.perf_counter()
        self._progress = progress
        if args.threads:
            torch.set_num_threads(args.threads)
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        splits = benchmark_splits(args, self.interactions)
        self._load_model()
        identity = split_identity(splits, self.model, str(args.model))
        state = load_checkpoint(checkpoint, args, identity, users=len(splits))
        resumed = state is not None
        state = state or {
            "fingerprint": fingerprint(args), "identity": identity, "validated": [], "examples": {},
            "validation_ids": [], "done": [], "records": [], "elapsed_s": 0.0,
        }  # fmt: skip
        self.tokenizer.padding_side = "left"
        train_items = [it for periods in splits.values() for split in periods for it in split.train]
        self._setup_decoding(train_items)
        self._gate = RelevanceGate("auto", quantile=args.gate_quantile, min_observations=1, window=10**12)
        self._timing: dict[str, float] = defaultdict(float, state.get("timing_s", {}))
        self._weights = sorted({*args.weight_grid(), float(args.interpolation_weight)})
        self._arms = [LOGO_ARMS[name] for name in args.arm_names()]
        self._mediated = [arm for arm in self._arms if arm in MEDIATED]
        self._community_on = any(ADAPTER_KIND[arm] == "community" for arm in self._arms)
        self._fold = {user: i % 2 for i, user in enumerate(splits)}
        from ..training import BaseLogProbCache

        self._community_cache = BaseLogProbCache(str(args.model))  # the community chains' (never the local chains')

        def save() -> None:
            state["timing_s"] = dict(self._timing)
            state["elapsed_s"] += time.perf_counter() - self._clock
            self._clock = time.perf_counter()
            save_checkpoint(checkpoint, state)

        self._clock = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="spring-logo-") as workdir:
            training_args = self._build(
                workdir, [], wrap_encoder=_CachedEncoder, use_global=True, num_threads=1, seed=args.seed,
                sharing_policy="consented", min_community_users=args.min_community_users,
            )  # fmt: skip
            self._train_items = train_items
            self._reset_memory()
            if "selection" not in state:
                state["selection"] = self._selection(splits, training_args)
                save()
            chosen = state["selection"]["chosen"]
            spring_args = training_args[(chosen["learning_rate"], chosen["num_train_epochs"])][0]
            pending = len(state["done"]) < len(splits)
            self._communities = (
                self._communities_for(splits, spring_args, workdir, checkpoint, state, save)
                if self._community_on and pending
                else {}
            )

            # σ is frozen before any validation or test query: the Q3 of the buffer scores of every user's period-0
            # training queries (the validation folds' rest), so validation and test rows are gated alike.
            # Validation feeds the mediators (and σ); without a mediated arm and a quantile gate it is not needed.
            todo = [user for user in splits if user not in set(state["validated"])]
            if not self._mediated and args.gate != "quantile":
                todo = []
            # σ needs every user's fit first; without a quantile gate each user's fit is trained right before their
            # validation, so a stopped run keeps every user it validated (fits are not checkpointed).
            eager = args.gate == "quantile"
            fitted = {
                user: self._fit_adapter(user, splits[user], spring_args)
                for user in tqdm(todo if eager else [], desc="validation adapters", disable=not progress)
            }
            if "gate_sigma" not in state:
                state["gate_sigma"] = self._sigma() if args.gate == "quantile" else None
                save()
            self._frozen_sigma = state["gate_sigma"]
            for user in tqdm(todo, desc="validation", disable=not progress):
                if not eager:
                    self._reset_memory()
                    fitted[user] = self._fit_adapter(user, splits[user], spring_args)
                self._reset_memory()  # every pass starts from one memory state, resumed or not
                examples, ids = self._validate_user(user, splits[user], spring_args, fitted.pop(user))
                for arm, rows in examples.items():
                    state["examples"].setdefault(arm, []).extend(_example_json(e) for e in rows)
                state["validation_ids"] += ids
                state["validated"].append(user)
                save()
            self.mediators = {}
            for arm in self._mediated:
                examples = [_example_from_json(e) for e in state["examples"].get(arm, [])]
                if not examples:
                    raise ValueError("no validation query: every user's period-0 training split is too short.")
                self.mediators[arm] = CalibratedMediator.fit(
                    examples, self._weights, min_examples=args.mediator_min_examples,
                    local_weight=float(args.interpolation_weight),
                )  # fmt: skip
            done = set(state["done"])
            for user in tqdm(list(splits), desc="test", disable=not progress):
                if user in done:
                    continue
                self._reset_memory()
                state["records"] += self._test_user(user, splits[user], spring_args)
                state["done"].append(user)
                save()
        state["elapsed_s"] += time.perf_counter() - self._clock
        results = {
            "config": dataclasses.asdict(args),
            "selection": state["selection"],
            "arms": [LOCAL, *self._arms],
            "mediators": {arm: m.config() for arm, m in self.mediators.items()},
            "communities": {
                str(fold): [{"name": a.name, "members": len(a.members), "items": a.num_items} for a in table]
                for fold, table in self._communities.items()
            },
            "validation": {
                "queries": {arm: len(state["examples"].get(arm, [])) for arm in self._mediated},
                "ids": sorted(set(state["validation_ids"])),
                "late_ids": sorted(it.id for periods in splits.values() for it in self._late_fold(periods)[1]),
                "max_n_local": max((e["n_local"] for rows in state["examples"].values() for e in rows), default=0),
            },
            "users": {u: [{"train": len(s.train), "test": len(s.test)} for s in ps] for u, ps in splits.items()},
            "records": state["records"],
            "gate_sigma": self._frozen_sigma,
            "policy": {"sharing_policy": "consented", "consenting_users": len(splits)},
            "resumed": resumed,
            "timing_s": {
                **{k: round(v, 1) for k, v in self._timing.items()},
                "total": round(state["elapsed_s"], 1),
                "this_process": round(time.perf_counter() - started, 1),
            },  # fmt: skip
        }
        results["summary"] = summarize_logo(results)
        return results

    # ------------------------------------------------------------------------------------------------ communities
    def _communities_for(self, splits, spring_args, workdir: str, checkpoint: Path | None, state: dict, save):
        """The folds' community adapters: trained, or with a checkpoint, loaded from the copy saved next to it when
        this run saved one (`logo_communities/`; bit-exact safetensors, so a resumed run decodes as an uninterrupted
        one), else trained and saved there."""
        from ..persistence.community_files import read_community_adapters, write_community_adapters

        where = checkpoint.parent / LOGO_COMMUNITIES if checkpoint is not None else None
        if where is not None and state.get("communities_saved"):
            tables = {}
            for fold in (0, 1):
                folder = where / f"fold-{fold}"
                table = read_community_adapters(folder, {p.name for p in folder.iterdir() if p.is_dir()})
                for adapter in table:
                    self.peft_model.load_adapter(str(folder / adapter.name), adapter_name=adapter.name)
                tables[fold] = table
            self.peft_model.eval()
            return tables
        tables = self._train_communities(splits, spring_args, workdir)
        if where is not None:
            for fold, table in tables.items():
                folder = where / f"fold-{fold}"
                folder.mkdir(parents=True, exist_ok=True)
                if len(table):
                    self.peft_model.save_pretrained(str(folder), selected_adapters=table.names)
                write_community_adapters(folder, table)
            state["communities_saved"] = True
            save()
        return tables

    def _train_communities(self, splits: dict[str, list], spring_args, workdir: str) -> dict[int, Any]:
        """Per fold, the community adapters trained on the other fold's users (through the library's
        [`ContinualPersonalizer.train_community_adapters`], on the study's model), so a user never decodes with a
        community adapter their own items trained."""
        from ..memory import LoGoMemory
        from ..training import ContinualPersonalizer

        args = self.args
        tables = {}
        tick = time.perf_counter()
        for fold in (0, 1):
            members = [user for user in splits if self._fold[user] == fold]
            memory = LoGoMemory(
                self.memory.encoder, scorer="bm25", gate=None, dedup_threshold=None, num_threads=1, seed=args.seed,
                min_community_users=args.community_min_users,
            )  # fmt: skip
            memory.add_many([it for user in members for split in splits[user] for it in split.train])
            personalizer = ContinualPersonalizer(
                self.peft_model, self.tokenizer, spring_args, memory, max_resident_adapters=10**6,
                offload_dir=os.path.join(workdir, f"communities-{fold}"),
            )  # fmt: skip
            table = personalizer.train_community_adapters(
                min_users=args.community_min_users, max_items_per_user=args.community_max_items_per_user,
                progress=self._progress,
            )  # fmt: skip
            self.peft_model = personalizer.model
            self.peft_model.eval()
            tables[1 - fold] = table  # the users of the other fold use these
        self._timing["train_communities"] += time.perf_counter() - tick
        return tables

    def _route(self, user: str, texts: Sequence[str]) -> str | None:
        """The community adapter (of the other fold) nearest the mean embedding of `texts`; None without one."""
        table = self._communities.get(self._fold[user])
        if table is None or not len(table) or not texts:
            return None
        return table.route(self.memory.embed(list(texts)).mean(axis=0))

    def _adapters(
        self, spring_args, user: str, history: Sequence[Interaction], name: str, community_arms: bool = True
    ) -> dict[str, str | None]:
        """The adapters of a cut: `local` (trained on `history`; the base model for an empty history) and, with
        community arms, `community` (the same training started from the community adapter nearest `history`, as
        [`ContinualPersonalizer`] starts a new user, with its own base log-prob cache; for an empty history the base
        model, as [`SpringForCausalLM`] decodes a user the memory holds nothing of) and `community_from` (the
        community adapter it started from, None when none was near enough: then it is the local adapter)."""
        adapters = {"local": self._train_cut(spring_args, user, history, name), "community_from": None}
        if self._community_on and community_arms:
            community = self._route(user, [it.text for it in history])
            if not history or community is None:  # nothing to start from: the local adapter (the base model at m=0)
                adapters["community"] = adapters["local"]
            else:
                self._drop_adapters([f"{name}c"])
                self._train(
                    spring_args, user, 0, history, f"{name}c", None, init_from=community,
                    score_cache=self._community_cache,
                )  # fmt: skip
                adapters["community"], adapters["community_from"] = f"{name}c", community
        return adapters

    def _adapter_for(self, arm: str, item: Interaction, adapters: dict[str, str | None]) -> str:
        """The adapter a row of `arm` decodes `item` with."""
        return adapters[ADAPTER_KIND[arm]] or BASE_ADAPTER

    # ------------------------------------------------------------------------------------------------ memory state
    def _reset_memory(self) -> None:
        """A fresh consented memory holding every user's training items in the run's order: each user's pass starts
        from this state (the cut passes re-add a user's items, which reorders users and labels: a resumed run must
        not see another order than an uninterrupted one)."""
        from ..memory import LoGoMemory

        users = list(dict.fromkeys(it.user_id for it in self._train_items))
        memory = LoGoMemory(self.memory.encoder, **self._memory_settings)
        for user in users:  # published headlines: every author consents to be quoted
            memory.set_sharing(user, True)
        memory.add_many(self._train_items)
        self.memory = self.spring_model.memory = memory

    def _set_history(self, user: str, items: Sequence[Interaction]) -> None:
        """The user's memory holds exactly `items` (their global contributions too, with their consent); the buffer is
        emptied."""
        self.memory.forget_user(user)
        self.memory.set_sharing(user, True)
        if items:
            self.memory.add_many(list(items))

    def _train_cut(self, args, user: str, items: Sequence[Interaction], name: str) -> str:
        """An adapter on `items` (period 0: every sample), which also sets the user's residual buffer."""
        self._drop_adapters([name])
        if not items:
            return BASE_ADAPTER
        self._train(args, user, 0, items, name, self.memory)
        return name

    # ------------------------------------------------------------------------------------------------ passes
    def _fold_items(self, periods) -> tuple[list[Interaction], list[Interaction]]:
        """The early validation fold of a user: the rest of period 0's training split and its latest
        `validation_fraction` (testable items only)."""
        period0 = list(periods[0].train)
        n_val = max(1, round(self.args.validation_fraction * len(period0)))
        return period0[:-n_val], [it for it in period0[-n_val:] if is_testable(it)]

    def _late_fold(self, periods) -> tuple[list[Interaction], list[Interaction]]:
        """The late validation fold of a user: the training stream before the latest `validation_fraction` of the
        last period's training split, and those items (testable only); empty with a single period."""
        if len(periods) < 2 or not periods[-1].train:
            return [], []
        stream = [it for split in periods for it in split.train]
        last = list(periods[-1].train)
        n_val = max(1, round(self.args.validation_fraction * len(last)))
        return stream[: len(stream) - n_val], [it for it in last[-n_val:] if is_testable(it)]

    def _fit_adapter(self, user, periods, spring_args) -> dict | None:
        """The validation "all" state of a user: the adapters of the early fold's rest (named `<user>__fit`, kept
        until the user's validation pass) and the residual buffer they left. Feeds σ with the fold's training
        queries."""
        from ..training import adapter_name_for

        fit, _ = self._fold_items(periods)
        if not fit:
            return None
        name = f"{adapter_name_for(user)}__fit"
        stream = [it for split in periods for it in split.train]
        try:
            self._set_history(user, fit)
            adapters = self._adapters(spring_args, user, fit, name, community_arms=BOTH in self._arms)
            if self.args.gate == "quantile":
                self._observe_gate(user, fit)  # training queries only calibrate σ
            buffer = (self.memory.buffer(user), self.memory.buffer_scores(user))
        finally:
            self._set_history(user, stream)
        return {"adapters": adapters, "fit": fit, "buffer": buffer, "names": [name, f"{name}c"]}

    def _validate_user(self, user, periods, spring_args, fitted: dict | None) -> tuple[dict[str, list], list[str]]:
        from ..training import adapter_name_for

        stream = [it for split in periods for it in split.train]
        _, val = self._fold_items(periods)
        name = f"{adapter_name_for(user)}__cut"
        position = {it.id: i for i, it in enumerate(stream)}
        examples: dict[str, list[MediatorExample]] = defaultdict(list)
        try:
            for m in self.args.cuts():
                if m is None and fitted is None:
                    continue
                rows = [it for it in val if m is None or position[it.id] >= m]  # never an item the cut holds
                if not rows:
                    continue
                if m is None:
                    history, adapters = fitted["fit"], fitted["adapters"]
                    self._set_history(user, history)
                    records, scores = fitted["buffer"]
                    self.memory.set_buffer(user, records, [scores.get(r.id, 0.0) for r in records] if scores else None)
                else:
                    history = stream[:m]
                    self._set_history(user, history)
                    adapters = self._adapters(spring_args, user, history, name, community_arms=BOTH in self._arms)
                for arm, tables in self._tables(user, rows, adapters, len(history))[0].items():
                    examples[arm] += [t["example"] for t in tables]
            history, late = self._late_fold(periods)
            if late and history:  # a warm user: the whole stream before the fold, as the test's "all" cut has it
                self._set_history(user, history)
                adapters = self._adapters(spring_args, user, history, name, community_arms=BOTH in self._arms)
                for arm, tables in self._tables(user, late, adapters, len(history))[0].items():
                    examples[arm] += [t["example"] for t in tables]
        finally:
            self._drop_adapters([name, f"{name}c"] + (fitted["names"] if fitted else []))
            self._set_history(user, stream)
        return examples, [it.id for it in val + late]

    def _test_user(self, user, periods, spring_args) -> list[dict[str, Any]]:
        from ..training import adapter_name_for

        args = self.args
        stream = [it for split in periods for it in split.train]
        name = f"{adapter_name_for(user)}__cut"
        records = []
        try:
            for m in args.cuts():
                if m is None:  # the full SPRInG chain; each period's test items under the state after its update
                    self._set_history(user, [])
                    self._drop_adapters([name, f"{name}c"])
                    adapters = {"local": name, "community": name, "community_from": None}
                    seen: list[Interaction] = []
                    for t, split in enumerate(periods):
                        self.memory.add_many(list(split.train))
                        seen += split.train
                        self._train(spring_args, user, t, split.train, name, self.memory)
                        if self._community_on:
                            if t == 0:
                                start = self._route(user, [it.text for it in split.train])
                                if start is not None:  # (none near enough: the community arms use the local chain)
                                    adapters["community"], adapters["community_from"] = f"{name}c", start
                            if adapters["community"] != name:
                                self._train(
                                    spring_args, user, t, split.train, f"{name}c", None,
                                    init_from=adapters["community_from"] if t == 0 else None,
                                    score_cache=self._community_cache,
                                )  # fmt: skip
                        if t >= 1:
                            records += self._score_and_decode(user, list(split.test), adapters, list(seen), None, t)
                    continue
                history = stream[:m]
                self._set_history(user, history)
                adapters = self._adapters(spring_args, user, history, name)
                for t in range(1, len(periods)):
                    # Only items after every item of the cut: a cut never holds what comes after its test item.
                    tests = [it for it in periods[t].test if not history or history[-1].timestamp < it.timestamp]
                    records += self._score_and_decode(user, tests, adapters, history, m, t)
        finally:
            self._drop_adapters([name, f"{name}c"])
            self._set_history(user, stream)
        return records

    # ------------------------------------------------------------------------------------------------ scoring
    def _contexts(self, user: str, item: Interaction):
        """`(gated local hits, global hits of consenting users)` for one query."""
        self.memory.gate = RelevanceGate(self._frozen_sigma)
        try:
            context = self.memory.retrieve_context(
                user,
                item.prompt,
                k=self.args.spring_k,
                region=self.args.retrieval_region,
                use_global=True,
                before=item.timestamp,
            )
        finally:
            self.memory.gate = RelevanceGate(None)
        return context.local_hits, context.global_hits

    def _tables(
        self, user: str, items: Sequence[Interaction], adapters: dict, n_local: int
    ) -> tuple[dict, dict, list]:
        """Per mediated arm and item, the hits and the NLL table over the context splits `local[: k - g] +
        global[: g]` and the λ grid under the arm's adapter (a [`MediatorExample`]); also the log-probabilities
        computed (the parametric and history paths, shared with the test pass) and each item's `(item, local,
        global)` hits."""
        k = self.args.spring_k
        queries = [(item, *self._contexts(user, item)) for item in items]
        wanted = []
        for item, local, global_hits in queries:
            for arm in self._mediated:
                adapter = self._adapter_for(arm, item, adapters)
                wanted += [(adapter, item, list(local[: k - g]) + list(global_hits[:g])) for g in range(k + 1)]
                wanted.append((adapter, item, []))
        logprobs = self._logprobs_for(wanted)
        out: dict[str, list] = defaultdict(list)
        for item, local, global_hits in queries:
            agreement = CalibratedMediator.agreement(local, global_hits)
            for arm in self._mediated:
                adapter = self._adapter_for(arm, item, adapters)
                par = logprobs[_context_key(adapter, item, [])]
                splits = [list(local[: k - g]) + list(global_hits[:g]) for g in range(k + 1)]
                table = np.array(
                    [[_mixture_nll(par, logprobs[_context_key(adapter, item, c)] if c else None, w)
                      for w in self._weights] for c in splits]
                )  # fmt: skip
                out[arm].append({
                    "item": item, "local": local, "global": global_hits,
                    "example": MediatorExample(n_local, bool(local), agreement, table, has_global=bool(global_hits)),
                })  # fmt: skip
        return out, logprobs, queries

    def _logprobs_for(self, wanted, cache: dict | None = None) -> dict[tuple, torch.Tensor]:
        """Per-token log-probabilities of each `(adapter, item, context)` gold response: the parametric path for an
        empty context (λ 0), the history path otherwise (λ 1). Each distinct one is computed once."""
        cache = {} if cache is None else cache
        todo: dict[tuple, BenchmarkRow] = {}
        for adapter, item, context in wanted:
            key = _context_key(adapter, item, context)
            if key not in cache and key not in todo:
                todo[key] = self._row("logo", item, adapter, list(context), 1.0 if context else 0.0)
        if todo:
            tick = time.perf_counter()
            keys = list(todo)
            cache.update(zip(keys, self._path_logprobs([todo[key] for key in keys]), strict=True))
            self._timing["nll"] += time.perf_counter() - tick
        return cache

    def _row(self, arm: str, item: Interaction, adapter: str, history: list, weight: float) -> BenchmarkRow:
        """A row on `adapter` with an explicit (mediated) history and λ, through the pipeline users call."""
        personalization = Personalization(user=item.user_id, adapter=adapter, history=history, weight=weight)
        return BenchmarkRow(arm, item, personalization)

    def _path_logprobs(self, rows: list[BenchmarkRow]) -> list[torch.Tensor]:
        """Per row, the gold response's per-token log-probabilities under its adapter and history (λ 0: the
        parametric path; λ 1: the history path), in float64 for the λ grid."""
        return [lp.double() for lp in self._decoder().logprobs(rows, dedup=False)]

    def _score_and_decode(self, user, tests, adapters, history, m, period) -> list[dict[str, Any]]:
        args = self.args
        if not tests:
            return []
        # The bias bucket's topic shares: over the user's history at the time (training items up to the test period).
        categories = Counter(it.metadata.get(args.category_field) for it in history) if args.category_field else None
        _, logprobs, queries = self._tables(user, tests, adapters, len(history))
        rows = []
        for item, local, global_hits in queries:
            for arm in (LOCAL, *self._arms):
                adapter = self._adapter_for(arm, item, adapters)
                if arm in MEDIATED:
                    context = self.mediators[arm].mediate(local, global_hits, len(history), args.spring_k)
                    items, weight = list(context.items), context.weight if context.items else 0.0
                else:  # local-only SPRInG on the arm's adapter
                    items, weight = list(local), args.interpolation_weight if local else 0.0
                rows.append(self._row(arm, item, adapter, items, weight))
        # Any path the tables did not score (the unmediated arms' adapters): each row's history and parametric path.
        paths = [(row.personalization.adapter, row.item, context) for row in rows
                 for context in (row.personalization.history, [])]  # fmt: skip
        self._logprobs_for(paths, logprobs)
        nlls = []
        for row in rows:
            p = row.personalization
            ret = logprobs[_context_key(p.adapter, row.item, p.history)] if p.history else None
            nlls.append(_mixture_nll(logprobs[_context_key(p.adapter, row.item, [])], ret, p.weight))
        tick = time.perf_counter()
        predictions = self._generate(rows)
        self._timing["generate"] += time.perf_counter() - tick
        scores = rouge_scores(predictions, [row.item.response for row in rows])
        total = sum(categories.values()) if categories else 0
        top_share = max(categories.values()) / total if total else 0.0
        records = []
        for row, nll, prediction, score in zip(rows, nlls, predictions, scores, strict=True):
            item = row.item
            category = item.metadata.get(args.category_field) if args.category_field else None
            share = categories.get(category, 0) / total if total else None
            records.append({
                "method": row.method, "user": user, "period": period, "cut": "all" if m is None else m,
                "n_local": len(history), "adapter": row.personalization.adapter,
                "community": adapters["community_from"] if ADAPTER_KIND[row.method] == "community" else None,
                "test_id": item.id, "category": category, "category_share": share,
                "bias": bool(m is None and share is not None and share < args.bias_rare_share
                             and top_share >= args.bias_dominant_share),
                "context_items": len(row.personalization.history),
                "global_items": sum(h.source == "global" for h in row.personalization.history),
                "weight": row.personalization.weight, "prediction": prediction, "reference": item.response,
                "nll": nll, **score,
            })  # fmt: skip
        return records


def _example_json(example: MediatorExample) -> dict[str, Any]:
    """A [`MediatorExample`] as the checkpoint stores it (JSON)."""
    return {"n_local": example.n_local, "has_local": example.has_local, "agreement": example.agreement,
            "nll": np.asarray(example.nll).tolist(), "has_global": example.has_global}  # fmt: skip


def _example_from_json(data: dict[str, Any]) -> MediatorExample:
    return MediatorExample(
        int(data["n_local"]),
        bool(data["has_local"]),
        data["agreement"],
        np.asarray(data["nll"], dtype=np.float64),
        has_global=bool(data["has_global"]),
    )


def _context_key(adapter: str, item: Interaction, context) -> tuple:
    return adapter, item.id, tuple(map(history_key, context))


def run_logo_benchmark(args: LoGoBenchmarkArguments, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Runs [`LoGoBenchmark`]`(args, **kwargs)` and saves its results to `args.out` (see [`save_logo_results`]);
    with `args.resume` (the default) a checkpoint in `args.out` carries the run across stops."""
    checkpoint = Path(args.out) / LOGO_CHECKPOINT if args.resume else None
    results = LoGoBenchmark(args, **kwargs).run(progress=progress, checkpoint=checkpoint)
    save_logo_results(results, args.out)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the results hold everything it did
        shutil.rmtree(checkpoint.parent / LOGO_COMMUNITIES, ignore_errors=True)
    return results
