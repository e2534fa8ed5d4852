"""`spring tune`: SPRInG's training and decoding settings chosen on each user's own stream, on validation data only,
for a bounded training cost. [`PersonalizationTuner`] searches, [`TuningResult`] saves what `spring train --config`
loads."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..generation.config import SpringConfig
from ..generation.logits_process import mix_logprobs
from ..records import Interaction, is_testable
from .spring_config import SpringTrainingArguments
from .tuning_config import TuningArguments

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class TrainingCandidate:
    """One point of the training grid (the part of the search that needs retraining)."""

    index: int
    learning_rate: float
    num_train_epochs: float
    selection: str
    selection_ratio: float

    def settings(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate, "num_train_epochs": self.num_train_epochs,
                "selection": self.selection, "selection_ratio": self.selection_ratio}  # fmt: skip


@dataclass
class TuningResult:
    """What [`PersonalizationTuner.tune`] chose and how.

    Args:
        options (`dict`): the chosen settings as `spring train` option names (`learning_rate`, `num_train_epochs`,
            `selection_ratio`, `interpolation_weight`, `top_k`, `gate_quantile`, `num_periods`).
        spring_config (`dict`): the chosen decoding settings as [`SpringConfig`] fields (`gate` is None here: σ is
            a property of a trained state, which `spring train` computes from `gate_quantile`).
        trials (`list[dict]`): every configuration tried: its settings, stage (`"training"` or `"decoding"`), rung,
            users, validation NLL, seconds and trained samples (samples x epochs).
        pareto (`list[dict]`): the training trials of rung 0 (all candidates on the same users) that no other one
            beats on both validation NLL and trained samples.
        cost (`dict`): `seconds`, `samples` (trained samples x epochs, all rungs), `one_pass_samples`, `ratio`
            (samples / one pass) and `max_cost`.
        notes (`list[str]`): what `spring train` cannot express of the choice (e.g. the history region).
        validation (`dict`): the users tuned on and skipped, and the validation items per user.
    """

    options: dict[str, Any]
    spring_config: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    pareto: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """`{"options", "spring_config", "report"}`: the layout `spring train --config` reads (its `"options"`)."""
        report = {"trials": self.trials, "pareto": self.pareto, "cost": self.cost, "notes": self.notes,
                  "validation": self.validation}  # fmt: skip
        return {"options": self.options, "spring_config": self.spring_config, "report": report}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes [`~TuningResult.to_dict`] as JSON (atomically) to `path`; returns the path.

        Args:
            path (`str` or `os.PathLike`): the file, e.g. `tuned.json`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(staging, path)
        return path


class PersonalizationTuner:
    r"""
    Chooses SPRInG's training settings (learning rate, epochs, selection) and decoding settings (λ, gate, top-k,
    retrieval region) for a user stream, on validation data only.

    Each user's stream (oldest first) is cut into `args.num_periods` periods as `spring train` cuts it. Adapters
    train on periods 0..P-2 with a candidate's settings (period 0 on everything, later ones drift-selected, the
    residual buffer rebuilt after each) and are judged on the items of period P-1, which nothing has trained on
    (the rolling scheme: in deployment they would be the next period's training items). Nothing else is read, so a
    caller's test items are safe as long as they are not passed in.

    The search is cost-aware. Training candidates go through successive halving: rung 0 trains every candidate on a
    subset of users (`args.rung_users`, default a third, at least 1; the users cheapest to train first) and keeps the best half by mean validation NLL
    of the adapter alone (λ = 0); each next rung doubles the users (users already trained for a survivor are not
    trained again) until one candidate is left, every user is in, or the next rung would exceed `args.max_cost`
    passes over the users' training items (trained samples x epochs). The decoding grid then runs on the winner's
    adapters without retraining: the mean per-token NLL of the validation gold responses under
    [`SpringForCausalLM.score`] for every (λ, gate, top-k, region). Lower is better; ties go to the earlier value
    of each grid (list the simpler options first).

    Args:
        model (`PreTrainedModel`): the base causal LM, **modified in place** (the candidates' LoRA adapters are added
            to it and removed at the end).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        interactions (`Sequence[Interaction]`): the stream to tune on.
        training_args ([`SpringTrainingArguments`]): the settings that are not searched (LoRA rank, buffer size,
            drift α, prompt template, ...); each candidate replaces `learning_rate`, `num_train_epochs` and
            `selection_ratio`.
        args ([`TuningArguments`]): periods, users, search space and budget.
        encoder (*optional*): the memory's encoder (default: `args.encoder`).
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.
        history_item_template (`str`, *optional*): how a retrieved item is rendered in the history path, as the
            state being tuned for will render it (`SpringConfig.history_item_template`; its default when omitted).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        interactions: Sequence[Interaction],
        training_args: SpringTrainingArguments,
        args: TuningArguments,
        *,
        encoder: Any = None,
        progress: bool = True,
        history_item_template: str | None = None,
    ):
        from ..records import coerce_interactions

        if not isinstance(training_args, SpringTrainingArguments):
            raise TypeError(f"`training_args` must be a SpringTrainingArguments, got {type(training_args).__name__}.")
        if not isinstance(args, TuningArguments):
            raise TypeError(f"`args` must be a TuningArguments, got {type(args).__name__}.")
        self.model = model
        self.tokenizer = tokenizer
        self.interactions = coerce_interactions(interactions, name="interactions")
        self.training_args = training_args
        self.args = args
        self.grid = args.grid()
        self.encoder = encoder
        self.progress = progress
        self.history_item_template = history_item_template
        self._personalizers: dict[int, Any] = {}
        self._formatter = None  # the prompt/response layout of validation items, built at the first score
        self._nlls: dict[tuple[int, str], list[float]] = {}  # (candidate, user) -> per-item validation NLLs

    # ------------------------------------------------------------------------------------------------ data
    def folds(self) -> tuple[dict[str, tuple[list, list[Interaction]]], list[str]]:
        """Per tuning user, `(fit_periods, validation_items)`: the [`PeriodSplit`]s 0..P-2 and the items of period
        P-1; and the users skipped for having fewer than `args.least_items` interactions.

        Raises:
            `ValueError`: no user left (naming `num_periods` and `min_items`), or an unknown `users` id.
        """
        from .train_job import pick_users, user_periods

        items = pick_users(self.interactions, self.args)
        # One item per period at least; the last period validates.
        splits, skipped = user_periods(items, self.args.num_periods, self.args.min_items, "given", "tuned on")
        # Only items that can be predicted validate: a text-only item (its input is its answer) would reward copying.
        folds = {user: (list(periods[:-1]), [it for it in periods[-1].train if is_testable(it)])
                 for user, periods in splits.items()}  # fmt: skip
        unpredictable = sorted(user for user, (_, val) in folds.items() if not val)
        if unpredictable and len(unpredictable) == len(folds):
            raise ValueError(
                "no user has an item in their last period that can be predicted (every one is text-only, e.g. a "
                "LaMP-7 profile tweet whose input is its answer): there is nothing to validate on."
            )
        folds = {user: fold for user, fold in folds.items() if fold[1]}
        return folds, sorted([*skipped, *unpredictable])

    def candidates(self) -> list[TrainingCandidate]:
        """The training grid, learning rate outermost (its order is the tie-break order)."""
        grid = self.grid
        points = itertools.product(grid["learning_rates"], grid["epochs"], grid["selections"])
        return [TrainingCandidate(i, lr, ep, sel, ratio) for i, (lr, ep, (sel, ratio)) in enumerate(points)]

    @staticmethod
    def planned_samples(candidate: TrainingCandidate, fit_periods: Sequence) -> float:
        """Trained samples x epochs of one user under `candidate`: period 0 on everything, later periods on
        `ceil(ratio · n)` (what the trainer selects)."""
        from .drift import num_selected

        count = len(fit_periods[0].train) + sum(
            num_selected(len(p.train), candidate.selection_ratio) for p in fit_periods[1:]
        )
        return count * candidate.num_train_epochs

    # ------------------------------------------------------------------------------------------------ training
    def _personalizer(self, candidate: TrainingCandidate):
        from ..memory import HashingEncoder, LoGoMemory, resolve_encoder
        from .continual import ContinualPersonalizer

        if candidate.index in self._personalizers:
            return self._personalizers[candidate.index]
        args = dataclasses.replace(
            self.training_args, learning_rate=candidate.learning_rate, num_train_epochs=candidate.num_train_epochs,
            selection_ratio=candidate.selection_ratio,
        )  # fmt: skip
        if self.encoder is None:
            self.encoder = HashingEncoder(256) if self.args.encoder == "hashing" else resolve_encoder(None)
        memory = LoGoMemory(
            self.encoder, scorer="bm25", gate=None, bm25_idf="lucene", buffer_size=max(args.buffer_size, 1),
            dedup_threshold=None, use_global=False, share_by_default=False,
        )  # fmt: skip
        # Own adapter names per candidate: every candidate's adapters live side by side in the one shared model.
        template = {"history_item_template": self.history_item_template} if self.history_item_template else {}
        config = SpringConfig(adapter_name_template=f"{{user_id}}__tune{candidate.index}", retrieval_region="buffer",
                              use_global=False, **template)  # fmt: skip
        personalizer = ContinualPersonalizer(
            self.model, self.tokenizer, args, memory, spring_config=config,
            max_resident_adapters=self.args.max_resident_adapters,
        )  # fmt: skip
        self._personalizers[candidate.index] = personalizer
        return personalizer

    def _train_user(self, candidate: TrainingCandidate, user: str, fit_periods: Sequence) -> float:
        """Trains `user` under `candidate` on the fit periods; returns the trained samples x epochs."""
        personalizer = self._personalizer(candidate)
        trained = 0.0
        for split in fit_periods:
            personalizer.memory.add_many(split.train)  # history holds training items only, never validation ones
            output = personalizer.observe(user, split.train)
            self.model = personalizer.model  # wrapped with peft at the first user: the next candidates share it
            trained += len(output.selected_ids) * candidate.num_train_epochs
        return trained

    def _drop(self, index: int) -> None:
        personalizer = self._personalizers.pop(index, None)
        if personalizer is not None:
            for user in personalizer.users:
                personalizer.forget_user(user)

    # ------------------------------------------------------------------------------------------------ scoring
    def _spring_model(self, personalizer, users: Sequence[str]):
        from ..generation import SpringForCausalLM

        for user in users:
            personalizer.load_user(user)
        self.model = personalizer.model
        self.model.eval()  # the Trainer leaves train mode (LoRA dropout) on
        return SpringForCausalLM(self.model, memory=personalizer.memory, config=personalizer.spring_config,
                                 tokenizer=self.tokenizer)  # fmt: skip

    def _item_nlls(self, spring_model, personalizer, user: str, items: Sequence[Interaction], **knobs) -> list[float]:
        """Per validation item, the mean per-token NLL of its gold response (the training target) under what
        `generate` would decode with for `knobs` (`weight`, `top_k`, `gate`, `region`; none: the adapter alone)."""
        return [_nll(logprobs) for logprobs in self._item_logprobs(spring_model, personalizer, user, items, **knobs)]

    def _item_logprobs(self, spring_model, personalizer, user: str, items: Sequence[Interaction], **knobs) -> list:
        """Per validation item, the per-token log-probabilities of its gold response (see [`_item_nlls`])."""
        from ..generation.personalization import Personalization
        from .data import SpringFormatter

        if self._formatter is None:  # candidates differ only in learning rate, epochs and selection: one layout
            self._formatter = SpringFormatter.from_args(self.tokenizer, self.training_args)
        formatter = self._formatter
        adapter = personalizer.adapter_name(user)
        out = []
        for item in items:
            sample = formatter.encode(item)
            ids = list(sample.input_ids)
            prompt = torch.tensor([ids[: sample.prompt_length]], device=spring_model.device)
            if knobs:
                row = Personalization(user=user, query=item.prompt, adapter=adapter, use_global=False, **knobs)
            else:
                row = Personalization(user=user, adapter=adapter, history=[], weight=0.0)
            with torch.no_grad():
                (logprobs,) = spring_model.score(prompt, [ids[sample.prompt_length :]], personalization=row)
            out.append(logprobs)
        return out

    # ------------------------------------------------------------------------------------------------ search
    def tune(self) -> TuningResult:
        """Runs the search (see the class docstring) and removes the candidates' adapters from the model.

        Returns:
            [`TuningResult`].

        Raises:
            `ValueError`: too few items for a validation split, or a `max_cost` below one candidate on one user.
        """
        try:
            return self._tune()
        finally:
            for index in list(self._personalizers):
                self._drop(index)

    def _tune(self) -> TuningResult:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        folds, skipped = self.folds()
        # Rungs grow from the users cheapest to train (fewest fit items; ties in stream order): the budget then buys
        # every candidate on several users at rung 0, and the heaviest users, who dominate the cost, join the last
        # rungs, where only the survivors train on them.
        users = sorted(folds, key=lambda u: sum(len(p.train) for p in folds[u][0]))
        candidates = self.candidates()
        one_pass = float(sum(len(p.train) for fit, _ in folds.values() for p in fit))
        budget = self.args.max_cost * one_pass
        spent = 0.0
        trials: list[dict[str, Any]] = []

        def rung_cost(alive: Sequence[TrainingCandidate], rung_users: Sequence[str]) -> float:
            return sum(
                self.planned_samples(c, folds[u][0])
                for c in alive
                for u in rung_users
                if (c.index, u) not in self._nlls
            )

        n = min(len(users), self.args.rung_users or max(1, math.ceil(len(users) / 3)))
        # Rung 0 shrinks to fit the budget; with one user, the costliest candidates go first (more epochs, more
        # samples), so every learning rate keeps its cheaper points.
        while n > 1 and rung_cost(candidates, users[:n]) > budget:
            n -= 1
        alive = list(candidates)
        while alive and rung_cost(alive, users[:n]) > budget:
            costliest = max(alive, key=lambda c: (rung_cost([c], users[:n]), c.index))
            alive.remove(costliest)
            dropped = costliest
            trials.append({"stage": "training", **dropped.settings(), "rung": 0, "users": 0, "validation_nll": None,
                           "seconds": 0.0, "trained_samples": 0.0, "status": "over budget"})  # fmt: skip
        if not alive:
            raise ValueError(
                f"`max_cost`={self.args.max_cost:g} is below the cost of training one candidate on one user "
                f"({rung_cost(candidates[:1], users[:1]) / one_pass:.2f} passes); raise it or shrink the grid."
            )
        if len(alive) < len(candidates):
            logger.warning(f"`max_cost`={self.args.max_cost:g}: {len(candidates) - len(alive)} of {len(candidates)} "
                           "training candidates do not fit the budget and are not tried.")  # fmt: skip
        rung = 0
        bar = tqdm(desc="spring tune", unit="train", disable=not self.progress, dynamic_ncols=True)
        while True:
            rung_users = users[:n]
            scores = []
            for candidate in alive:
                tick, trained = time.perf_counter(), 0.0
                todo = [u for u in rung_users if (candidate.index, u) not in self._nlls]
                for user in todo:
                    bar.set_postfix_str(f"rung {rung} candidate {candidate.index} {user[:20]}")
                    trained += self._train_user(candidate, user, folds[user][0])
                    bar.update(1)
                personalizer = self._personalizers[candidate.index]
                spring_model = self._spring_model(personalizer, [])
                for user in todo:
                    personalizer.load_user(user)
                    self._nlls[(candidate.index, user)] = self._item_nlls(spring_model, personalizer, user,
                                                                          folds[user][1])  # fmt: skip
                spent += trained
                nll = statistics.fmean(x for u in rung_users for x in self._nlls[(candidate.index, u)])
                scores.append((nll, candidate.index, candidate))
                trials.append({"stage": "training", **candidate.settings(), "rung": rung, "users": len(rung_users),
                               "validation_nll": nll, "seconds": time.perf_counter() - tick,
                               "trained_samples": trained, "status": "trained"})  # fmt: skip
            scores.sort(key=lambda s: (s[0], s[1]))
            ranked = [s[2] for s in scores]
            if len(ranked) == 1 or n >= len(users):
                break
            survivors = ranked[: math.ceil(len(ranked) / 2)]
            next_n = min(len(users), 2 * n)
            if spent + rung_cost(survivors, users[:next_n]) > budget:
                logger.info(f"spring tune: the next rung would exceed `max_cost`={self.args.max_cost:g}; stopping "
                            f"at rung {rung}.")  # fmt: skip
                break
            for loser in ranked[len(survivors) :]:
                self._drop(loser.index)
            alive, n, rung = survivors, next_n, rung + 1
        bar.close()
        winner = ranked[0]
        for loser in ranked[1:]:
            self._drop(loser.index)
        final_users = users[:n]
        training_seconds = time.perf_counter() - started

        decoding, best = self._decoding_search(winner, final_users, folds)
        trials += decoding
        pareto = _pareto(
            [t for t in trials if t["stage"] == "training" and t["rung"] == 0 and t["status"] == "trained"]
        )
        choice = decoding[best]
        gate_quantile = choice["gate_quantile"]
        options = {
            "learning_rate": winner.learning_rate,
            "num_train_epochs": winner.num_train_epochs,
            "selection_ratio": winner.selection_ratio,
            "interpolation_weight": choice["interpolation_weight"],
            "top_k": choice["top_k"],
            "gate": "off" if gate_quantile is None else "quantile",
            "retrieval_region": choice["retrieval_region"],
            "copy_weight": choice["copy_weight"],
            "adaptive_weight": choice["adaptive_weight"],
            "num_periods": self.args.num_periods,
        }
        if gate_quantile is not None:
            options["gate_quantile"] = gate_quantile
        notes = []
        spring_config = {"interpolation_weight": choice["interpolation_weight"], "top_k": choice["top_k"],
                         "gate": None, "retrieval_region": choice["retrieval_region"], "use_global": False,
                         "copy_weight": choice["copy_weight"],
                         "adaptive_weight": choice["adaptive_weight"]}  # fmt: skip
        seconds = time.perf_counter() - started
        cost = {"seconds": seconds, "training_seconds": training_seconds, "samples": spent,
                "one_pass_samples": one_pass, "ratio": spent / one_pass, "max_cost": self.args.max_cost,
                "rungs": rung + 1}  # fmt: skip
        validation = {"users": final_users, "tuning_users": users, "skipped_users": skipped,
                      "validation_items": {u: len(folds[u][1]) for u in users},
                      "rule": "each user's last of `num_periods` periods validates; adapters train on the earlier "
                      "ones; mean per-token NLL of the gold responses, lower is better, ties to the earlier option"}  # fmt: skip
        logger.info(f"spring tune: chose {options} (validation NLL {choice['validation_nll']:.4f}) for "
                    f"{spent / one_pass:.2f} passes of training.")  # fmt: skip
        return TuningResult(options, spring_config, trials, pareto, cost, notes, validation)

    def _decoding_search(self, winner: TrainingCandidate, users: Sequence[str], folds) -> tuple[list[dict], int]:
        """Every (λ, gate, top-k, region) on the winner's adapters; returns the trials and the best one's index."""
        from .train_job import buffer_gate

        grid = self.grid
        personalizer = self._personalizers[winner.index]
        spring_model = self._spring_model(personalizer, [])
        # σ pools the buffer scores of the update periods' training prompts, as `spring train` computes it.
        streams = {u: [it for p in (folds[u][0][1:] or folds[u][0]) for it in p.train] for u in users}
        sigmas = {(q, k, region): buffer_gate(personalizer.memory, streams, k, q, region) for _, q in grid["gates"]
                  if q is not None for k in grid["top_ks"] for region in grid["regions"]}  # fmt: skip
        trials, cache, paths = [], {}, {}

        def logprobs(weight: float, sigma, k: int, region: str, copy: float, beta: float = 0.0) -> list:
            """Every validation item's gold log-probabilities under one setting (all users, in order)."""
            out = []
            for user in users:
                personalizer.load_user(user)
                out += self._item_logprobs(spring_model, personalizer, user, folds[user][1], weight=weight, top_k=k,
                                           gate=sigma, region=region, copy_weight=copy,
                                           adaptive_weight=beta)  # fmt: skip
            return out

        combos = list(itertools.product(grid["interpolation_weights"], grid["gates"], grid["top_ks"], grid["regions"],
                                        grid["copy_weights"]))  # fmt: skip
        for weight, (gate_name, quantile), k, region, copy in combos:
            tick = time.perf_counter()
            sigma = None if quantile is None else sigmas[(quantile, k, region)]
            # λ = 0 without copying scores the adapter alone whatever the retrieval: computed once.
            key = (0.0,) if weight == 0 and copy == 0 else (weight, sigma, k, region, copy)
            if key not in cache:
                if copy == 0 and 0 < weight < 1:
                    # Without the copy path only the mixture depends on λ: both paths are scored once per retrieval
                    # setting (λ = 0 and λ = 1 return them exactly) and mixed here as `score` mixes them.
                    if "main" not in paths:
                        paths["main"] = logprobs(0.0, sigma, k, region, 0.0)
                        cache[(0.0,)] = statistics.fmean(_nll(lp) for lp in paths["main"])
                    if (sigma, k, region) not in paths:
                        paths[(sigma, k, region)] = logprobs(1.0, sigma, k, region, 0.0)
                        cache[(1.0, sigma, k, region, 0.0)] = statistics.fmean(
                            _nll(lp) for lp in paths[(sigma, k, region)]
                        )
                    mixed = [
                        mix_logprobs(hist, main, weight)
                        for hist, main in zip(paths[(sigma, k, region)], paths["main"], strict=True)
                    ]
                    cache[key] = statistics.fmean(_nll(lp) for lp in mixed)
                else:
                    scored = logprobs(weight, sigma, k, region, copy)
                    if copy == 0 and weight in (0.0, 1.0):  # the paths a mixed λ reuses
                        paths["main" if weight == 0 else (sigma, k, region)] = scored
                    cache[key] = statistics.fmean(_nll(lp) for lp in scored)
            trials.append({"stage": "decoding", **winner.settings(), "interpolation_weight": weight, "gate": gate_name,
                           "gate_quantile": quantile, "sigma": sigma, "top_k": k, "retrieval_region": region,
                           "copy_weight": copy, "adaptive_weight": 0.0, "rung": None, "users": len(users),
                           "validation_nll": cache[key], "seconds": time.perf_counter() - tick,
                           "trained_samples": 0.0})  # fmt: skip
        best = min(range(len(trials)), key=lambda i: (trials[i]["validation_nll"], i))
        # The per-token adaptive λ needs both paths' full distributions at every token, so it is not mixed from the
        # cached paths: each β > 0 is scored for every intermediate λ on the best retrieval and copy setting only.
        # (Among the mixed trials: at λ = 0 every retrieval setting ties, so the best overall may name any of them.)
        mixed = [i for i, t in enumerate(trials) if 0 < t["interpolation_weight"] < 1]
        fixed = dict(trials[min(mixed, key=lambda i: (trials[i]["validation_nll"], i))]) if mixed else {}
        betas = [b for b in grid["adaptive_weights"] if b > 0] if mixed else []
        for weight, beta in itertools.product([w for w in grid["interpolation_weights"] if 0 < w < 1], betas):
            tick = time.perf_counter()
            scored = logprobs(weight, fixed["sigma"], fixed["top_k"], fixed["retrieval_region"], fixed["copy_weight"],
                              beta)  # fmt: skip
            trials.append({**fixed, "interpolation_weight": weight, "adaptive_weight": beta,
                           "validation_nll": statistics.fmean(_nll(lp) for lp in scored),
                           "seconds": time.perf_counter() - tick})  # fmt: skip
        best = min(range(len(trials)), key=lambda i: (trials[i]["validation_nll"], i))
        return trials, best


def _nll(logprobs: torch.Tensor) -> float:
    """The mean per-token NLL of one response from its tokens' log-probabilities."""
    return float(-logprobs.float().mean())


def _pareto(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials no other one beats on both validation NLL and trained samples (lower is better for both)."""
    front = []
    for t in trials:
        dominated = any(
            o["validation_nll"] <= t["validation_nll"] and o["trained_samples"] <= t["trained_samples"]
            and (o["validation_nll"] < t["validation_nll"] or o["trained_samples"] < t["trained_samples"])
            for o in trials
        )  # fmt: skip
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t["trained_samples"], t["validation_nll"]))


def run_tune_job(
    job: TuningArguments,
    training_args: SpringTrainingArguments,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    interactions: Sequence[Interaction] | None = None,
    encoder: Any = None,
    progress: bool = True,
) -> TuningResult:
    """Reads `job.data` (unless `interactions` is given), loads `job.model` (unless `model` is), runs
    [`PersonalizationTuner`] and saves the result to `job.out` for `spring train --config`.

    Args:
        job ([`TuningArguments`]): data, model, output file, periods, search space and budget.
        training_args ([`SpringTrainingArguments`]): the settings that are not searched.
        model (`PreTrainedModel`, *optional*): the base model (modified in place while tuning).
        tokenizer (*optional*): its tokenizer (required with `model`).
        interactions (`Sequence[Interaction]`, *optional*): the stream, instead of `job.data`.
        encoder (*optional*): the memory's encoder (default: `job.encoder`).
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.

    Returns:
        [`TuningResult`] (also written to `job.out`).
    """
    from ..data.tasks import PRESETS, read_stream
    from .train_job import DEFAULT_PROMPT_TEMPLATE, _load_model, _quiet_in_place_notice, resolve_preset

    if not isinstance(job, TuningArguments):
        raise TypeError(f"`job` must be a TuningArguments, got {type(job).__name__}.")
    if (model is None) != (tokenizer is None):
        raise ValueError("pass `model` and `tokenizer` together (or neither, to load `job.model`).")
    if job.threads:
        torch.set_num_threads(job.threads)
    template = None
    if interactions is None:
        if not job.data.strip():
            raise ValueError("`data` is required: the JSONL (or News Category / LaMP) file to tune on.")
        interactions = read_stream(Path(job.data), job.data_format, lamp_outputs=job.lamp_outputs,
                                   lamp_task=job.lamp_task, lamp_queries=job.lamp_queries)  # fmt: skip
        preset = resolve_preset(job)
        # The user message and history rendering `spring train` would use: the same validation NLL, the same
        # adapters, the same history path.
        if preset != "none":
            template = PRESETS[preset].history_item_template
            if training_args.prompt_template == DEFAULT_PROMPT_TEMPLATE:
                training_args.prompt_template = PRESETS[preset].prompt_template
    owned = model is None
    tuner = PersonalizationTuner(model, tokenizer, interactions, training_args, job, encoder=encoder,
                                 progress=progress, history_item_template=template)  # fmt: skip
    tuner.folds()  # too few items fails before the model is loaded
    if owned:
        tuner.model, tuner.tokenizer = _load_model(job.model)
    with _quiet_in_place_notice(owned):
        result = tuner.tune()
    result.save(job.out)
    return result
