"""The LoGo study: does the global (collective) memory help cold-start users and users with a skewed history, over
local-only SPRInG, with a mediator fitted on validation queries only?"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
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
from .data import benchmark_splits
from .decoding import BenchmarkRow, history_key
from .logo_benchmark_config import LoGoBenchmarkArguments
from .metrics import rouge_scores
from .report import save_logo_results

logger = logging.get_logger(__name__)

LOCAL, LOGO, OPEN = "spring-local", "spring-logo", "spring-logo-open"


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
    The LoGo study on the benchmark's users, splits, model and decoding.

    - **History cuts.** Each user's test items (the held-out split of every period from 1 on, as in the benchmark)
      are evaluated with the user's history cut to their first `m` training items, for every `m` of `history_cuts`.
      A cut user's SPRInG is what SPRInG would be with only those items: an adapter trained on them (none for
      `m = 0`) and a local memory and residual buffer holding only them. "all" is the full SPRInG chain (period 0,
      then drift-selected updates), each period's test items decoded after that period's update with the history
      up to it. **The other users' memories stay whole.** Global items are
      read with `before=<the item's date>`, and only items the sharing rule lets out ([`ContributorSupport`]).
    - **Gate σ, frozen before any validation or test query**: the `gate_quantile` of the residual-buffer BM25 scores
      of every user's period-0 training queries (each query's own entry excluded).
    - **Arms, on the same adapter and gate σ.** `spring-local`: SPRInG's buffer hits behind the gate, λ =
      `interpolation_weight`. `spring-logo`: the same local hits and the global hits, mediated by a
      [`CalibratedMediator`] fitted on validation queries. `spring-logo-open` (`compare_open`): the same with the
      sharing rule off, and its own fitted mediator.
    - **Validation, never test, on every kind of user.** Two folds per user, from two periods:
      - *early*: the latest `validation_fraction` of the period-0 training split, each item scored under every
        history cut that does not contain it (the "all" cut is an adapter on the rest of period 0);
      - *late* (with two periods or more): the latest `validation_fraction` of the last period's training split,
        scored with the whole training stream before it as the history and an adapter trained on it, so that warm
        users (the test's "all" cut, dozens of items) are in the fit, not only the cold ones.
      Every row is scored for every context split (`global_slots` of `spring_k`) and λ of `mediator_weights`. The
      mediator is fitted on these tables before any test item is decoded, and keeps a cell's local decision unless
      the validation gain clears its bound (see [`CalibratedMediator.fit`]).
    - **Buckets.** Cold start: `m <= 5`; warm: "all". Bias: at "all", test items whose topic (`category_field`)
      is under `bias_rare_share` of the user's training items so far while the user's top topic holds at least
      `bias_dominant_share` of them.

    Args:
        args ([`LoGoBenchmarkArguments`]): the settings.
        model, tokenizer, interactions: as for [`ContinualBenchmark`].
    """

    def __init__(self, args: LoGoBenchmarkArguments, model=None, tokenizer=None, interactions=None):
        if not isinstance(args, LoGoBenchmarkArguments):
            raise TypeError(f"`args` must be LoGoBenchmarkArguments, got {type(args).__name__}.")
        super().__init__(args, model, tokenizer, interactions)
        self.methods = []  # the study's arms are its own (`LOCAL`, `LOGO`, `OPEN`), not benchmark methods

    # ------------------------------------------------------------------------------------------------ run
    def run(self, progress: bool = True, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
        """Runs the validation pass, fits the mediators, then the test pass. Returns `config`, `selection`,
        `mediators` (each arm's fitted rules and cell counts), `validation` (counts and ids), `users`, `records`
        (one per test item, cut and arm), `summary` (see [`summarize_logo`]) and `timing_s`."""
        from .report import summarize_logo

        if checkpoint is not None:
            raise ValueError("the LoGo study does not checkpoint: pass `checkpoint=None`.")
        args = self.args
        started = time.perf_counter()
        self._progress = progress
        if args.threads:
            torch.set_num_threads(args.threads)
        splits = benchmark_splits(args, self.interactions)
        self._load_model()
        self.tokenizer.padding_side = "left"
        train_items = [it for periods in splits.values() for split in periods for it in split.train]
        self._setup_decoding(train_items)
        self._gate = RelevanceGate("auto", quantile=args.gate_quantile, min_observations=1, window=10**12)
        self._timing: dict[str, float] = defaultdict(float)
        self._weights = sorted({*args.weight_grid(), float(args.interpolation_weight)})
        with tempfile.TemporaryDirectory(prefix="spring-logo-") as workdir:
            training_args = self._build(
                workdir, train_items, wrap_encoder=_CachedEncoder, use_global=True, num_threads=1, seed=args.seed,
                min_contributors=args.min_contributors, match_threshold=args.match_threshold,
                min_community_users=args.min_community_users,
            )  # fmt: skip
            selection = self._selection(splits, training_args)
            chosen = selection["chosen"]
            spring_args = training_args[(chosen["learning_rate"], chosen["num_train_epochs"])][0]
            self._arms = [LOGO, OPEN] if args.compare_open else [LOGO]

            # σ is frozen before any validation or test query: the Q3 of the buffer scores of every user's period-0
            # training queries (the validation folds' rest), so validation and test rows are gated alike.
            fitted = {
                user: self._fit_adapter(user, splits[user], spring_args)
                for user in tqdm(list(splits), desc="validation adapters", disable=not progress)
            }
            self._frozen_sigma = self._sigma()
            examples: dict[str, list[MediatorExample]] = {arm: [] for arm in self._arms}
            validation_ids: list[str] = []
            for user in tqdm(list(splits), desc="validation", disable=not progress):
                validation_ids += self._validate_user(user, splits[user], spring_args, examples, fitted[user])
            self.mediators = {}
            for arm in self._arms:
                if not examples[arm]:
                    raise ValueError("no validation query: every user's period-0 training split is too short.")
                self.mediators[arm] = CalibratedMediator.fit(
                    examples[arm], self._weights, min_examples=args.mediator_min_examples,
                    local_weight=float(args.interpolation_weight),
                )  # fmt: skip
            records: list[dict[str, Any]] = []
            for user in tqdm(list(splits), desc="test", disable=not progress):
                records += self._test_user(user, splits[user], spring_args)
        results = {
            "config": dataclasses.asdict(args),
            "selection": selection,
            "mediators": {arm: m.config() for arm, m in self.mediators.items()},
            "validation": {
                "queries": {arm: len(e) for arm, e in examples.items()},
                "ids": sorted(set(validation_ids)),
                "late_ids": sorted(it.id for periods in splits.values() for it in self._late_fold(periods)[1]),
                "max_n_local": max((e.n_local for e in examples[self._arms[0]]), default=0),
            },
            "users": {u: [{"train": len(s.train), "test": len(s.test)} for s in ps] for u, ps in splits.items()},
            "records": records,
            "gate_sigma": self._frozen_sigma,
            "rule": {"min_contributors": args.min_contributors, "match_threshold": args.match_threshold},
            "timing_s": {
                **{k: round(v, 1) for k, v in self._timing.items()},
                "total": round(time.perf_counter() - started, 1),
            },  # fmt: skip
        }
        results["summary"] = summarize_logo(results)
        return results

    # ------------------------------------------------------------------------------------------------ memory state
    def _set_history(self, user: str, items: Sequence[Interaction]) -> None:
        """The user's memory holds exactly `items` (their global contributions too); the buffer is emptied."""
        self.memory.forget_user(user)
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
    def _fold(self, periods) -> tuple[list[Interaction], list[Interaction]]:
        """The validation fold of a user: the rest of period 0's training split and its latest
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
        """The validation "all" state of a user: an adapter on the fold's rest (named `<user>__fit`, kept until the
        user's validation pass) and the residual buffer it left. Feeds σ with the fold's training queries."""
        from ..training import adapter_name_for

        fit, _ = self._fold(periods)
        if not fit:
            return None
        name = f"{adapter_name_for(user)}__fit"
        stream = [it for split in periods for it in split.train]
        try:
            self._set_history(user, fit)
            self._train_cut(spring_args, user, fit, name)
            self._observe_gate(user, fit)  # training queries only calibrate σ
            buffer = (self.memory.buffer(user), self.memory.buffer_scores(user))
        finally:
            self._set_history(user, stream)
        return {"adapter": name, "fit": fit, "buffer": buffer}

    def _validate_user(self, user, periods, spring_args, examples, fitted: dict | None) -> list[str]:
        from ..training import adapter_name_for

        stream = [it for split in periods for it in split.train]
        _, val = self._fold(periods)
        name = f"{adapter_name_for(user)}__cut"
        position = {it.id: i for i, it in enumerate(stream)}
        try:
            for m in self.args.cuts():
                if m is None and fitted is None:
                    continue
                rows = [it for it in val if m is None or position[it.id] >= m]  # never an item the cut holds
                if not rows:
                    continue
                if m is None:
                    history, adapter = fitted["fit"], fitted["adapter"]
                    self._set_history(user, history)
                    records, scores = fitted["buffer"]
                    self.memory.set_buffer(user, records, [scores.get(r.id, 0.0) for r in records] if scores else None)
                else:
                    history = stream[:m]
                    self._set_history(user, history)
                    adapter = self._train_cut(spring_args, user, history, name)
                for arm, tables in self._tables(user, rows, adapter, len(history)).items():
                    examples[arm] += [t["example"] for t in tables]
            history, late = self._late_fold(periods)
            if late and history:  # a warm user: the whole stream before the fold, as the test's "all" cut has it
                self._set_history(user, history)
                adapter = self._train_cut(spring_args, user, history, name)
                for arm, tables in self._tables(user, late, adapter, len(history)).items():
                    examples[arm] += [t["example"] for t in tables]
        finally:
            self._drop_adapters([name] + ([fitted["adapter"]] if fitted else []))
            self._set_history(user, stream)
        return [it.id for it in val + late]

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
                    self._drop_adapters([name])
                    seen: list[Interaction] = []
                    for t, split in enumerate(periods):
                        self.memory.add_many(list(split.train))
                        seen += split.train
                        self._train(spring_args, user, t, split.train, name, self.memory)
                        if t >= 1:
                            records += self._score_and_decode(user, list(split.test), name, list(seen), None, t)
                    continue
                history = stream[:m]
                self._set_history(user, history)
                adapter = self._train_cut(spring_args, user, history, name)
                for t in range(1, len(periods)):
                    # Only items after every item of the cut: a cut never holds what comes after its test item.
                    tests = [it for it in periods[t].test if not history or history[-1].timestamp < it.timestamp]
                    records += self._score_and_decode(user, tests, adapter, history, m, t)
        finally:
            self._drop_adapters([name])
            self._set_history(user, stream)
        return records

    # ------------------------------------------------------------------------------------------------ scoring
    def _contexts(self, user: str, item: Interaction, arm: str):
        """`(gated local hits, servable global hits)` for one query, with the arm's sharing rule."""
        gm = self.memory.global_memory
        gm.set_support_rule(min_contributors=1 if arm == OPEN else self.args.min_contributors)
        self.memory.gate = RelevanceGate(self._frozen_sigma)
        try:
            context = self.memory.retrieve_context(
                user, item.prompt, k=self.args.spring_k, region="buffer", use_global=True, before=item.timestamp
            )
        finally:
            self.memory.gate = RelevanceGate(None)
            gm.set_support_rule(min_contributors=self.args.min_contributors)
        return context.local_hits, context.global_hits

    def _tables(self, user: str, items: Sequence[Interaction], adapter: str, n_local: int) -> dict[str, list]:
        """Per arm and item: the hits, the gold response's per-token log-probabilities on the parametric path and
        on the history path of every context split `local[: k - g] + global[: g]`, and the NLL table over the splits
        and the λ grid (a [`MediatorExample`])."""
        k = self.args.spring_k
        queries = [(item, arm, *self._contexts(user, item, arm)) for item in items for arm in self._arms]
        wanted = [(item, []) for item in items]
        for item, _, local, global_hits in queries:
            wanted += [(item, list(local[: k - g]) + list(global_hits[:g])) for g in range(k + 1)]
        logprobs = self._logprobs_for(adapter, wanted)
        out: dict[str, list] = defaultdict(list)
        for item, arm, local, global_hits in queries:
            par = logprobs[_context_key(item, [])]
            splits = [list(local[: k - g]) + list(global_hits[:g]) for g in range(k + 1)]
            table = np.array(
                [[_mixture_nll(par, logprobs[_context_key(item, c)] if c else None, w) for w in self._weights]
                 for c in splits]
            )  # fmt: skip
            agreement = CalibratedMediator.agreement(local, global_hits)
            out[arm].append({
                "item": item, "local": local, "global": global_hits, "logprobs": logprobs,
                "example": MediatorExample(n_local, bool(local), agreement, table, has_global=bool(global_hits)),
            })  # fmt: skip
        return out

    def _logprobs_for(self, adapter: str, wanted, cache: dict | None = None) -> dict[tuple, torch.Tensor]:
        """Per-token log-probabilities of each `(item, context)` gold response: the parametric path for an empty
        context (λ 0), the history path otherwise (λ 1). Each distinct one is computed once."""
        cache = {} if cache is None else cache
        todo: dict[tuple, BenchmarkRow] = {}
        for item, context in wanted:
            key = _context_key(item, context)
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

    def _score_and_decode(self, user, tests, adapter, history, m, period) -> list[dict[str, Any]]:
        args = self.args
        if not tests:
            return []
        # The bias bucket's topic shares: over the user's history at the time (training items up to the test period).
        categories = Counter(it.metadata.get(args.category_field) for it in history) if args.category_field else None
        tables = self._tables(user, tests, adapter, len(history))
        rows, meta = [], []
        for i, item in enumerate(tests):
            local = tables[LOGO][i]["local"]
            rows.append(self._row(LOCAL, item, adapter, list(local), args.interpolation_weight if local else 0.0))
            for arm in self._arms:
                entry = tables[arm][i]
                context = self.mediators[arm].mediate(entry["local"], entry["global"], len(history), args.spring_k)
                rows.append(
                    self._row(arm, item, adapter, list(context.items), context.weight if context.items else 0.0)
                )
        logprobs = tables[LOGO][0]["logprobs"] if tests else {}
        wanted = [(row.item, row.personalization.history) for row in rows]
        self._logprobs_for(adapter, wanted, logprobs)  # any context not tabled
        for row in rows:
            history, weight = row.personalization.history, row.personalization.weight
            ret = logprobs[_context_key(row.item, history)] if history else None
            meta.append(_mixture_nll(logprobs[_context_key(row.item, [])], ret, weight))
        tick = time.perf_counter()
        predictions = self._generate(rows)
        self._timing["generate"] += time.perf_counter() - tick
        scores = rouge_scores(predictions, [row.item.response for row in rows])
        total = sum(categories.values()) if categories else 0
        top_share = max(categories.values()) / total if total else 0.0
        records = []
        for row, nll, prediction, score in zip(rows, meta, predictions, scores, strict=True):
            item = row.item
            category = item.metadata.get(args.category_field) if args.category_field else None
            share = categories.get(category, 0) / total if total else None
            records.append({
                "method": row.method, "user": user, "period": period, "cut": "all" if m is None else m,
                "n_local": len(history),
                "test_id": item.id, "category": category, "category_share": share,
                "bias": bool(m is None and share is not None and share < args.bias_rare_share
                             and top_share >= args.bias_dominant_share),
                "context_items": len(row.personalization.history),
                "global_items": sum(h.source == "global" for h in row.personalization.history),
                "weight": row.personalization.weight, "prediction": prediction, "reference": item.response, "nll": nll, **score,
            })  # fmt: skip
        return records


def _context_key(item: Interaction, context) -> tuple:
    return item.id, tuple(map(history_key, context))


def run_logo_benchmark(args: LoGoBenchmarkArguments, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Runs [`LoGoBenchmark`]`(args, **kwargs)` and saves its results to `args.out` (see [`save_logo_results`])."""
    results = LoGoBenchmark(args, **kwargs).run(progress=progress)
    save_logo_results(results, args.out)
    return results
