"""The continual-personalization benchmark: the SPRInG paper's temporal protocol, its baselines and ablations, on
one model, one set of users and one split."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..generation import Personalization
from ..generation.adapters import BASE_ADAPTER, adapter_name_for
from ..memory.encoders import normalize_rows
from ..memory.gate import RelevanceGate
from ..records import Interaction, is_testable
from .benchmark_config import BenchmarkArguments
from .checkpoint import fingerprint, load_checkpoint, save_checkpoint, split_identity
from .data import benchmark_splits
from .decoding import BenchmarkRow, RowDecoder, decoding_budget, line_end_tokens
from .methods import MethodSpec, earlier_training_items, floor_prediction, rag_items, resolve_methods
from .metrics import rouge_scores
from .report import rebuild_report, save_results

logger = logging.get_logger(__name__)

# The naming rule of the SPRInG chain's adapters (`adapter_name_for(user, SPRING_ADAPTER_TEMPLATE)`), the wrapper's
# `SpringConfig.adapter_name_template`. Kept from earlier releases: a LoRA's initial weights are seeded by its name.
SPRING_ADAPTER_TEMPLATE = "{user_id}__spring"
# The spring-tuned chain's adapters: the naming rule of its own wrapper (`ContinualBenchmark.tuned_model`).
TUNED_ADAPTER_TEMPLATE = "{user_id}__tuned"


class ContinualBenchmark:
    r"""
    Runs the SPRInG paper's protocol for a list of methods on the same model, users and splits.

    Protocol: each user's time-sorted stream is cut into `num_periods` periods; within a period the earliest items
    train and the latest `test_fraction` are held out for testing (only items a test can be: a LaMP-7 tweet, whose
    input is its answer, never is). First, the LoRA learning rate and epochs are chosen on a validation split of
    period 0's training items (see [`BenchmarkArguments.learning_rates`]). Period 0 initialises (every LoRA method
    starts from the same period-0 adapter, trained on all of it); at each period `t ≥ 1` every method updates on the
    period's training split, then decodes the period's test split (greedy, repetition penalty 1.2, the same line-end
    stop and training-split token budget for all). After the last period, period 1's test split is decoded again
    with the final state (forgetting). Scores: unstemmed ROUGE-1 / ROUGE-L F (LaMP's setting) and stemmed ROUGE-L,
    averaged per sample, then per period, and the gold response's per-token NLL under what each method decodes with;
    a cold-start bucket holds test items whose user had at most `cold_start_max_train` training items in the period.

    Users run one after another (only one user's adapters are ever loaded); within a user and period, every method's
    rows share batched `generate` calls (each row routed to its own adapter and history by [`SpringForCausalLM`]).

    SPRInG tuned (`spring-tuned`): before any user runs, [`PersonalizationTuner`] (`spring tune`) searches SPRInG's
    training and decoding settings once, on every user's *training* items only (each user's last of `num_periods`
    cuts of them validates; see `tune_grid` and `tune_max_cost`). Its chain then trains with the chosen learning
    rate, epochs and selection into its own adapters and residual buffer (a second memory, filled period by period;
    when the search chose SPRInG's own training settings, SPRInG's adapter and buffer are copied instead of trained
    twice), and its rows decode through a second `SpringForCausalLM` configured with the chosen λ, k, region, copy
    weight and gate, called as a user calls it (`Personalization(user=..., query=..., gate=σ)`).

    Args:
        args ([`BenchmarkArguments`]): the settings.
        model (`PreTrainedModel`, *optional*): the causal LM; loaded from `args.model` when omitted.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): its tokenizer.
        interactions (`list[Interaction]`, *optional*): the data; read from `args.data` when omitted.
    """

    def __init__(self, args: BenchmarkArguments, model=None, tokenizer=None, interactions=None):
        self.args = args
        self.methods = resolve_methods(args.methods)
        self.model, self.tokenizer = model, tokenizer
        self.interactions = interactions
        # spring-tuned's parts, set up once its search has run (see `_setup_tuned`).
        self.tuned_model = self.tuned_memory = None
        self._tuned_gate: RelevanceGate | None = None
        self._tuned_mirrors_spring = False

    # ------------------------------------------------------------------------------------------------ set-up
    def _load_model(self) -> None:
        if self.model is not None:
            if self.tokenizer is None:
                raise ValueError("`tokenizer` is required when `model` is given.")
            return
        from ..utils import load_causal_lm, load_smollm2

        self.model, self.tokenizer = (
            load_smollm2() if self.args.model == "smollm2" else load_causal_lm(self.args.model)
        )

    def _training_args(self, out_dir: str) -> dict[tuple[float, float], tuple[Any, Any]]:
        """Per `(learning_rate, num_train_epochs)` that may be used (the selection grid and the fixed setting):
        SPRInG's arguments and the plain ones (every sample, no buffer) of the other LoRA methods and the selection."""
        from ..training import SpringTrainingArguments

        args = self.args
        common = dict(
            output_dir=out_dir, prompt_template=args.prompt_template,
            per_device_train_batch_size=args.per_device_train_batch_size, seed=args.seed,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True, logging_strategy="no", report_to="none",
            save_strategy="no",
        )  # fmt: skip
        built = {}
        for lr, epochs in dict.fromkeys([*args.selection_grid(), (args.learning_rate, args.num_train_epochs)]):
            spring = SpringTrainingArguments(
                selection_ratio=args.selection_ratio, buffer_size=args.buffer_size, learning_rate=lr,
                num_train_epochs=epochs, **common,
            )  # fmt: skip
            # All built now, before any trainer exists: a new TrainingArguments re-initialises accelerate's state.
            built[(lr, epochs)] = (spring, dataclasses.replace(spring, selection_ratio=1.0, buffer_size=0))
        return built

    # ------------------------------------------------------------------------------------------------ selection
    def _select_hyperparameters(self, splits: dict[str, list], training_args: dict) -> dict[str, Any]:
        """Picks the LoRA learning rate and epochs on validation data only.

        For each selection user, the latest `validation_fraction` of the period-0 *training* split is held out; a
        fresh LoRA per grid point trains (on every sample, as period 0 does) on the rest, and the held-out gold
        responses are scored (per-token NLL, adapter only). The grid point of the lowest mean NLL over all held-out
        items wins (ties: the earlier). No test item is read.
        """
        from ..data import select_users

        args = self.args
        grid = args.selection_grid()
        counts = {user: sum(len(s.train) + len(s.test) for s in periods) for user, periods in splits.items()}
        n_users = min(args.selection_users or len(counts), len(counts))
        folds = {}
        for user in select_users(counts, n_users, strategy="stratified"):
            train = list(splits[user][0].train)
            n_val = max(1, round(args.validation_fraction * len(train)))
            # Only items a test could be: a text-only item (its input is its answer) would reward copying.
            val = [it for it in train[-n_val:] if is_testable(it)]
            if len(train) - n_val >= 1 and val:
                folds[user] = (train[:-n_val], val)
        if not folds:
            logger.warning(
                "no selection user has a testable period-0 training item to hold out behind another one: the "
                f"validation selection is skipped and `learning_rate`={args.learning_rate:g}, "
                f"`num_train_epochs`={args.num_train_epochs:g} are used."
            )
            fixed = {"learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs}
            return {"chosen": fixed, "grid": [], "rule": "fixed (no period-0 training item to hold out)"}
        tick = time.perf_counter()
        name = "bench_select"
        scores = []
        for lr, epochs in tqdm(grid, desc="validation grid", disable=not self._progress):
            plain = training_args[(lr, epochs)][1]
            nlls: list[float] = []
            for user, (fit, val) in folds.items():
                self._drop_adapters([name])
                self._train(plain, user, 0, fit, name)
                nlls += self._nll([self._adapter_row("select", user, item, name) for item in val])
            scores.append({"learning_rate": lr, "num_train_epochs": epochs, "validation_nll": statistics.fmean(nlls)})
        self._drop_adapters([name])
        best = min(range(len(scores)), key=lambda i: (scores[i]["validation_nll"], i))
        self._timing["selection"] += time.perf_counter() - tick
        return {
            "chosen": {key: scores[best][key] for key in ("learning_rate", "num_train_epochs")},
            "grid": scores,
            "users": list(folds),
            "fit_items": sum(len(fit) for fit, _ in folds.values()),
            "validation_items": sum(len(val) for _, val in folds.values()),
            "validation_ids": sorted(item.id for _, val in folds.values() for item in val),
            "rule": f"the latest {args.validation_fraction:g} of each selection user's period-0 training split held "
            "out; lowest mean per-token NLL of its gold responses under a fresh LoRA trained on the rest",
        }

    # ------------------------------------------------------------------------------------------------ run
    def run(self, progress: bool = True, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
        """Runs the validation selection, then every method for every user and period.

        Args:
            progress (`bool`, *optional*, defaults to `True`): tqdm bars over the grid and the users.
            checkpoint (`str` or `os.PathLike`, *optional*): a JSON file written (atomically) after the selection
                and after every user; given an existing one made with the same settings, the run continues after its
                last finished user, with its selection and gate state.

        Returns:
            `dict`: `config`, `selection` (the validation grid and the chosen learning rate and epochs), `users` (with
            their per-period train/test counts), `records` (one per decoded test item: method, user, period, phase,
            prediction, reference, scores, NLL), `summary` (see [`summarize`]) and `bootstrap`; with spring-tuned,
            `tuning` (the search's choice, its trials and its `cost`: seconds, trained samples and passes).
        """

        args = self.args
        self._clock = time.perf_counter()
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
            "fingerprint": fingerprint(args), "identity": identity, "done": [], "records": [], "elapsed_s": 0.0,
        }  # fmt: skip
        self.tokenizer.padding_side = "left"
        train_items = [it for periods in splits.values() for split in periods for it in split.train]
        self._setup_decoding(train_items)
        # σ is the memory's own online-quantile gate, fed only training-query scores, and read (never fed) at test
        # time; the window is unbounded so every observed score counts.
        self._gate = RelevanceGate("auto", quantile=args.gate_quantile, min_observations=1, window=10**12)
        self._gate.load_observed(np.asarray(state.get("gate_scores", []), dtype=np.float64))
        self._timing: dict[str, float] = defaultdict(float, state.get("timing_s", {}))
        with tempfile.TemporaryDirectory(prefix="spring-bench-") as workdir:
            training_args = self._build(workdir, train_items, use_global=False)
            if "selection" not in state:
                state["selection"] = self._selection(splits, training_args, any(m.adapter for m in self.methods))
                self._checkpoint(checkpoint, state)
            chosen = state["selection"]["chosen"]
            spring_args, plain_args = training_args[(chosen["learning_rate"], chosen["num_train_epochs"])]
            if self._tuned_names():
                if "tuning" not in state:  # a resumed run keeps its search: tuning again would cost as much
                    state["tuning"] = self._tune(splits, spring_args)
                    self._checkpoint(checkpoint, state)
                self._setup_tuned(state["tuning"], spring_args, state.get("tuned_gate_scores", []))
            done = set(state["done"])
            for user in tqdm(list(splits), desc="users", disable=not progress):
                if user in done:
                    continue
                state["records"] += self._run_user(user, splits[user], spring_args, plain_args)
                state["done"].append(user)
                self._checkpoint(checkpoint, state)
        self._tick(state)
        records = state["records"]
        names = [m.name for m in self.methods]
        results = {
            "config": dataclasses.asdict(args),
            "methods": names,
            "selection": state["selection"],
            "users": {
                user: [{"train": len(s.train), "test": len(s.test)} for s in periods]
                for user, periods in splits.items()
            },
            "records": records,
            "timing_s": {**{k: round(v, 1) for k, v in self._timing.items()}, "total": round(state["elapsed_s"], 1)},
            "resumed": resumed,
            "gate_sigma": self._sigma(),
            "decoding": {
                "max_new_tokens": self._budget,
                "budget": "given"
                if args.max_new_tokens
                else f"q{args.budget_quantile:g} of training response tokens + 1",
                "stop_at_newline": args.stop_at_newline,
                "repetition_penalty": args.repetition_penalty,
                "greedy": True,
            },
        }
        if "tuning" in state:
            results["tuning"] = self._tuning_report(state["tuning"])
        return rebuild_report(results)  # summary, bootstrap and drift tables: one code path with `spring report`

    def _tick(self, state: dict[str, Any]) -> None:
        """Adds the wall time since the last tick to the run's total (which a checkpoint carries across stops)."""
        now = time.perf_counter()
        state["elapsed_s"] += now - self._clock
        self._clock = now

    def _checkpoint(self, path: Path | None, state: dict[str, Any]) -> None:
        self._tick(state)
        state["gate_scores"] = self._gate.observed().tolist()
        if self._tuned_gate is not None:
            state["tuned_gate_scores"] = self._tuned_gate.observed().tolist()
        state["timing_s"] = dict(self._timing)
        save_checkpoint(path, state)

    def _build(self, workdir: str, train_items: Sequence[Interaction], wrap_encoder=None, **memory_kwargs) -> dict:
        """The run's working parts: the training arguments (returned), the peft model with an anchor adapter, the base
        log-prob cache, the memory holding every training item, and the SPRInG wrapper routing rows to adapters.

        Args:
            workdir (`str`): the trainers' output directory.
            train_items (`Sequence[Interaction]`): every user's training items (never a test item): the history
                the RAG baselines and the global memory read from, restricted by period or by date (`before=`).
            wrap_encoder (`callable`, *optional*): wraps the encoder (the LoGo study caches embeddings).
            memory_kwargs: further [`LoGoMemory`] settings.
        """
        from peft import get_peft_model

        from ..generation import SpringConfig, SpringForCausalLM
        from ..memory import HashingEncoder, LoGoMemory, resolve_encoder
        from ..training import BaseLogProbCache, build_lora_config

        args = self.args
        training_args = self._training_args(workdir)
        # An anchor adapter no row uses: peft cannot delete a model's last adapter, and users' adapters come and go.
        anchor = training_args[(args.learning_rate, args.num_train_epochs)][0]
        self.peft_model = get_peft_model(self.model, build_lora_config(anchor, self.model), "bench_anchor")
        self.score_cache = BaseLogProbCache(str(args.model))
        encoder = HashingEncoder(256) if args.encoder == "hashing" else resolve_encoder(None)
        # Kept for spring-tuned's memory, which must retrieve exactly as this one does.
        self._memory_settings = dict(
            scorer="bm25", gate=None, bm25_idf=args.bm25_idf, buffer_size=max(args.buffer_size, 1),
            dedup_threshold=None, **memory_kwargs,
        )  # fmt: skip
        self.memory = LoGoMemory(wrap_encoder(encoder) if wrap_encoder else encoder, **self._memory_settings)
        self.memory.add_many(train_items)
        self.spring_model = SpringForCausalLM(
            self.peft_model, memory=self.memory, tokenizer=self.tokenizer,
            config=SpringConfig(
                interpolation_weight=args.interpolation_weight, top_k=args.spring_k,
                history_item_template=args.history_item_template, retrieval_region="buffer", use_global=False,
                adapter_name_template=SPRING_ADAPTER_TEMPLATE,
            ),
        )  # fmt: skip
        return training_args

    def _selection(self, splits: dict[str, list], training_args: dict, trains_adapters: bool = True) -> dict:
        """The validation selection of the LoRA learning rate and epochs, or the fixed setting when the grid is
        empty or no method trains an adapter."""
        args = self.args
        if args.selection_grid() and trains_adapters:
            return self._select_hyperparameters(splits, training_args)
        fixed = {"learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs}
        return {"chosen": fixed, "grid": [], "rule": "fixed (no selection)"}

    def _setup_decoding(self, train_items: Sequence[Interaction]) -> None:
        """The token budget (from the training split only) and the line-end stop, the same for every method."""
        from ..training import SpringFormatter

        args = self.args
        self._formatter = SpringFormatter(self.tokenizer, prompt_template=args.prompt_template)
        self._budget = args.max_new_tokens or decoding_budget(self.tokenizer, train_items, args.budget_quantile)
        self._line_end_tokens = line_end_tokens(self.tokenizer) if args.stop_at_newline else None

    def _decoder(self, spring_model=None) -> RowDecoder:
        """Decodes rows through `spring_model` (default `self.spring_model`), the `SpringForCausalLM` users call."""
        return RowDecoder(
            self.spring_model if spring_model is None else spring_model, self.tokenizer, self._formatter,
            max_new_tokens=self._budget, repetition_penalty=self.args.repetition_penalty,
            batch_size=self.args.generation_batch_size, line_end_tokens=self._line_end_tokens,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ spring-tuned
    def _tuned_names(self) -> set[str]:
        """The methods decoded through spring-tuned's wrapper."""
        return {m.name for m in self.methods if m.adapter == "tuned"}

    def _tune(self, splits: dict[str, list], spring_args) -> dict[str, Any]:
        """Runs [`PersonalizationTuner`] once on every user's training items (never a test item) and returns its
        [`~TuningResult.to_dict`] plus the number of items it read and the rule.

        The tuner adds its candidates' adapters to the benchmark's peft model and removes them at the end; it gets
        the model already wrapped (after `_build`), so peft never has to delete a model's last adapter (the anchor
        stays) and no LoRA layer is injected into a model peft wraps again later.

        Args:
            splits (`dict[str, list[PeriodSplit]]`): the run's users and periods.
            spring_args ([`SpringTrainingArguments`]): the settings it does not search (LoRA, buffer size, prompt
                template, batch size, seed): SPRInG's in this run.
        """
        from ..training.tuning import PersonalizationTuner

        items = [it for periods in splits.values() for split in periods for it in split.train]
        tick = time.perf_counter()
        before = set(self.peft_model.peft_config)
        try:
            with warnings.catch_warnings():
                # The tuner deletes its adapters one by one, an active one among them: peft warns that it activates
                # another. Nothing to act on: the anchor is made active again below.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                result = PersonalizationTuner(
                    self.peft_model, self.tokenizer, items, spring_args, self.args.tuning_arguments(),
                    encoder=self.memory.encoder, progress=self._progress,
                    history_item_template=self.args.history_item_template,
                ).tune()  # fmt: skip
        finally:
            self._drop_adapters(set(self.peft_model.peft_config) - before)  # none if the tuner cleaned up
            self.peft_model.eval()  # its trainers leave train mode (LoRA dropout) on
        self._timing["tuning"] += time.perf_counter() - tick
        return {
            # As the checkpoint stores it (JSON), so that a resumed run reports exactly what a fresh one does.
            **json.loads(json.dumps(result.to_dict(), default=str)),
            "training_items": len(items),
            "rule": f"`spring tune` on every user's training items only, each user's stream of them cut into "
            f"{self.args.num_periods} periods: the last one validates (mean per-token NLL of its gold responses), "
            "the earlier ones train; no test item is read",
        }

    def _setup_tuned(self, tuning: dict[str, Any], spring_args, gate_scores: Sequence[float]) -> None:
        """spring-tuned's parts from the search's choice: its training arguments, its memory (the residual buffers
        of its own chain), its wrapper (the chosen decoding settings, its own adapter names) and its gate."""
        from ..generation import SpringConfig, SpringForCausalLM
        from ..memory import LoGoMemory

        options = tuning["options"]
        chosen = (options["learning_rate"], options["num_train_epochs"], options["selection_ratio"])
        # With SPRInG's own training settings the chain would repeat SPRInG's training step for step (the same
        # trainer, items and settings; only the LoRA's initial weights, seeded by the adapter name, differ): it
        # copies SPRInG's adapter and buffer after each period instead (see `_run_user`), at no training cost.
        fixed = (spring_args.learning_rate, spring_args.num_train_epochs, spring_args.selection_ratio)
        self._tuned_mirrors_spring = chosen == fixed
        self._tuned_args = dataclasses.replace(
            spring_args, learning_rate=chosen[0], num_train_epochs=chosen[1], selection_ratio=chosen[2]
        )
        # Its own memory: the chain's residual buffers must not overwrite SPRInG's. It is filled with each period's
        # training items as the chain reaches them, so a history region never returns a later period's item.
        self.tuned_memory = LoGoMemory(self.memory.encoder, **self._memory_settings)
        base = SpringConfig(history_item_template=self.args.history_item_template,
                            adapter_name_template=TUNED_ADAPTER_TEMPLATE)  # fmt: skip
        # Every decoding field the search chose, whatever they are (the tuner's grid may grow).
        config = dataclasses.replace(base, **tuning["spring_config"])
        self.tuned_model = SpringForCausalLM(self.peft_model, memory=self.tuned_memory, config=config,
                                             tokenizer=self.tokenizer)  # fmt: skip
        self._tuned_gate = None
        if options.get("gate") == "quantile":
            # σ as for SPRInG: an online quantile of training-query scores against the chain's memory, here of the
            # chosen region and k (σ must compare like with like), read but never fed at test time.
            self._tuned_gate = RelevanceGate("auto", quantile=options["gate_quantile"], min_observations=1,
                                             window=10**12)  # fmt: skip
            self._tuned_gate.load_observed(np.asarray(gate_scores, dtype=np.float64))

    def _update_tuned(self, user: str, period: int, train, names: dict[str, str], mirror: bool) -> None:
        """spring-tuned's update for one period: its memory gains the period's training items, then its adapter
        trains with the tuned settings, or (`mirror`) takes SPRInG's adapter and buffer of this period."""
        self.tuned_memory.add_many(train)
        if not mirror:
            self._train(self._tuned_args, user, period, train, names["tuned"], self.tuned_memory)
            return
        tick = time.perf_counter()
        self._copy_adapter(names["spring"], names["tuned"], self._tuned_args)
        self.peft_model.eval()  # a new adapter's modules start in train mode (LoRA dropout on)
        buffer, scores = self.memory.buffer(user), self.memory.buffer_scores(user)
        self.tuned_memory.set_buffer(
            user, buffer, scores=[scores[it.id] for it in buffer] if all(it.id in scores for it in buffer) else None
        )
        self._timing["train_tuned"] += time.perf_counter() - tick

    def _observe_tuned_gate(self, user: str, train) -> None:
        """spring-tuned's σ pool: the period's *training* queries against its memory (each item's own entry
        excluded), with the chosen k and region; nothing when the search turned the gate off."""
        if self._tuned_gate is None:
            return
        config = self.tuned_model.spring_config
        region = {} if config.retrieval_region == "all" else {"region": config.retrieval_region}
        for item in train:
            hits = self.tuned_memory.retrieve_context(
                user, item.prompt, k=config.top_k + 1, use_global=False, **region
            ).items
            self._tuned_gate.observe([hit.score for hit in hits if hit.interaction.id != item.id][: config.top_k])

    def _tuned_sigma(self) -> float | None:
        threshold = None if self._tuned_gate is None else self._tuned_gate.current_threshold()
        return None if threshold is None else float(threshold)

    def _tuning_report(self, tuning: dict[str, Any]) -> dict[str, Any]:
        """`results["tuning"]`: the choice (`options`, `spring_config`), its `cost` and the search's report, and
        spring-tuned's final σ."""
        report = tuning.get("report", {})
        return {
            "options": tuning["options"],
            "spring_config": tuning["spring_config"],
            "cost": report.get("cost", {}),
            "gate_sigma": self._tuned_sigma(),
            "chain": "SPRInG's (the same training settings: its adapter and buffer copied after each period)"
            if self._tuned_mirrors_spring and "spring" in self._needed_adapters()
            else "its own (trained with the tuned settings)",
            "training_items": tuning.get("training_items"),
            "rule": tuning.get("rule"),
            **{key: value for key, value in report.items() if key != "cost"},
        }

    # ------------------------------------------------------------------------------------------------ per user
    def _needed_adapters(self) -> set[str]:
        return {m.adapter for m in self.methods if m.adapter is not None}

    def _train(
        self,
        args,
        user: str,
        period: int,
        items,
        name: str,
        memory=None,
        init_from: str | None = None,
        score_cache=None,
    ) -> None:
        """One period of `user`'s adapter `name` ([`SpringTrainer`]); a new adapter starts from adapter `init_from`'s
        weights when given (as [`ContinualPersonalizer`] starts a new user from their community's adapter)."""
        from transformers import PrinterCallback, ProgressCallback

        from ..training import SpringTrainer
        from ..training.lora import copy_adapter_weights

        tick = time.perf_counter()
        trainer = SpringTrainer(
            model=self.peft_model, args=args, user_id=user, period=period, train_interactions=list(items),
            memory=memory, processing_class=self.tokenizer, adapter_name=name,
            score_cache=score_cache if score_cache is not None else self.score_cache,
        )  # fmt: skip
        for callback in (PrinterCallback, ProgressCallback):  # the benchmark has its own progress bar
            trainer.remove_callback(callback)
        if init_from is not None and trainer.created_adapter:
            copy_adapter_weights(self.peft_model, init_from, name)
        trainer.run_period()
        self.peft_model.eval()  # the Trainer leaves the model in train mode (LoRA dropout on)
        self._timing[f"train_{name.rsplit('__', 1)[-1]}"] += time.perf_counter() - tick

    def _copy_adapter(self, source: str, target: str, args) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from ..training import build_lora_config

        if target in self.peft_model.peft_config:
            self.peft_model.delete_adapter(target)
        self.peft_model.add_adapter(target, build_lora_config(args, self.peft_model))
        state = get_peft_model_state_dict(self.peft_model, adapter_name=source)
        set_peft_model_state_dict(self.peft_model, state, adapter_name=target)

    def _drop_adapters(self, names) -> None:
        self.peft_model.set_adapter("bench_anchor")  # deleting the active adapter would activate another one
        for name in names:
            if name in self.peft_model.peft_config:
                self.peft_model.delete_adapter(name)

    def _run_user(self, user: str, periods, spring_args, plain_args) -> list[dict[str, Any]]:
        args = self.args
        needed = self._needed_adapters()
        # SPRInG's chain is the user's own adapter under the wrapper's naming rule (SPRING_ADAPTER_TEMPLATE), so its
        # rows decode exactly as `generate(personalization=user)` does; the comparison chains are chosen per row.
        names = {kind: adapter_name_for(user, f"{{user_id}}__{kind}") for kind in ("all100", "random30", "oppu_each")}
        names["spring"] = adapter_name_for(user, SPRING_ADAPTER_TEMPLATE)
        names["tuned"] = adapter_name_for(user, TUNED_ADAPTER_TEMPLATE)
        rng = random.Random(f"{args.seed}:{user}")
        records: list[dict[str, Any]] = []
        try:
            # Period 0: one adapter on all of it, the common starting point of every continual LoRA chain (every
            # method reading SPRInG's buffer decodes with the "spring" chain, so `needed` covers them too).
            if needed & {"spring", "all100", "random30"}:
                self._train(spring_args, user, 0, periods[0].train, names["spring"], self.memory)
                for kind in ("all100", "random30"):
                    if kind in needed:
                        self._copy_adapter(names["spring"], names[kind], spring_args)
            # spring-tuned's chain: its own period 0 (the tuned learning rate and epochs apply from the start), or
            # SPRInG's, copied, when the search chose SPRInG's training settings and SPRInG trains in this run.
            mirror = "spring" in needed and self._tuned_mirrors_spring
            if "tuned" in needed:
                self._update_tuned(user, 0, periods[0].train, names, mirror)
            for t in range(1, len(periods)):
                train = periods[t].train
                if "spring" in needed:
                    self._train(spring_args, user, t, train, names["spring"], self.memory)
                    self._observe_gate(user, train)
                if "tuned" in needed:
                    self._update_tuned(user, t, train, names, mirror)
                    self._observe_tuned_gate(user, train)
                if "all100" in needed:
                    self._train(plain_args, user, t, train, names["all100"])
                if "random30" in needed:
                    subset = rng.sample(list(train), math.ceil(args.selection_ratio * len(train)))
                    self._train(plain_args, user, t, sorted(subset, key=lambda it: it.timestamp), names["random30"])
                if "oppu_each" in needed:  # from the base model every period
                    self._drop_adapters([names["oppu_each"]])
                    self._train(plain_args, user, 0, train, names["oppu_each"])
                records += self._evaluate(user, periods, t, t, names, phase="period")
            if len(periods) > 2:  # forgetting: period 1's test split under the final state
                records += self._evaluate(user, periods, 1, len(periods) - 1, names, phase="forgetting")
        finally:
            self._drop_adapters(names.values())
        return records

    # ------------------------------------------------------------------------------------------------ retrieval
    def _observe_gate(self, user: str, train) -> None:
        """Adds the buffer retrieval scores of the period's *training* queries (each item's own entry excluded) to
        the pool σ is computed from: no test query ever calibrates the gate."""
        for item in train:
            hits = self.memory.retrieve_context(
                user, item.prompt, k=self.args.spring_k + 1, region="buffer", use_global=False
            ).items
            self._gate.observe([hit.score for hit in hits if hit.interaction.id != item.id][: self.args.spring_k])

    def _sigma(self) -> float | None:
        threshold = self._gate.current_threshold()
        return None if threshold is None else float(threshold)

    def _rag_items(self, method: MethodSpec, user: str, periods, t: int, item: Interaction, query_vector) -> list:
        """RAG's top `rag_k` of the user's training items of period `t` ("each") or periods `0..t` ("accum")."""
        first = t if method.scope == "each" else 0
        candidates = [it for split in periods[first : t + 1] for it in split.train]
        vectors = None
        if method.retrieval == "dense":
            ids = {c.id for c in candidates}
            stored, stored_vectors = self.memory.history_embeddings(user)
            keep = [i for i, c in enumerate(stored) if c.id in ids]
            candidates, vectors = [stored[i] for i in keep], stored_vectors[keep]
        return rag_items(method, candidates, item.prompt, self.args.rag_k, vectors=vectors, query_vector=query_vector)

    def _personalization(self, method: MethodSpec, user: str, item: Interaction, history, names) -> Personalization:
        """What a row of `method` hands to `SpringForCausalLM`, as a user would: SPRInG's rows name the user alone
        (the user's adapter and memory, the buffer region of the wrapper's config, σ as the call's gate); the other
        methods pick their adapter chain (`adapter=`), their raw-history RAG items (`history=`) and λ. spring-tuned's
        rows name the user alone too, for its own wrapper (the tuned settings, its adapters and memory)."""
        if method.adapter == "tuned":
            return Personalization(user=user, query=item.prompt, gate=self._tuned_sigma())
        adapter = names[method.adapter] if method.adapter else BASE_ADAPTER
        own = adapter_name_for(user, SPRING_ADAPTER_TEMPLATE)
        adapter = None if adapter == own else adapter  # the user's own adapter: routed by the naming rule
        if method.retrieval in ("buffer", "buffer+global"):
            use_global = method.retrieval == "buffer+global"
            return Personalization(
                user=user, query=item.prompt, gate=self._sigma() if method.gate else None, use_global=use_global,
                adapter=adapter,
                retrieval_kwargs={"before": item.timestamp} if use_global else None,
            )  # fmt: skip
        return Personalization(user=user, adapter=adapter, history=list(history or []), weight=method.weight)

    def _adapter_row(self, method: str, user: str, item: Interaction, adapter: str) -> BenchmarkRow:
        """A row decoded with `adapter` alone (the parametric path)."""
        return BenchmarkRow(method, item, Personalization(user=user, adapter=adapter, history=[], weight=0.0))

    # ------------------------------------------------------------------------------------------------ decoding
    def _evaluate(self, user: str, periods, test_period: int, state_period: int, names, phase: str):
        rows: list[BenchmarkRow] = []
        dense = any(m.retrieval == "dense" for m in self.methods)
        for item in periods[test_period].test:
            query_vector = None
            if dense:  # once per test item, shared by the dense "each" and "accum" baselines
                query_vector = normalize_rows(self.memory.encoder.encode([item.prompt]), "query embedding")[0]
            for method in self.methods:
                if method.is_floor:
                    # Floors read the test period's and earlier training items only, in both phases.
                    floor = floor_prediction(method.floor, earlier_training_items(periods, test_period, item), item)
                    rows.append(BenchmarkRow(method.name, item, prediction=floor))
                    continue
                history = None
                if method.retrieval in ("bm25", "dense"):
                    history = self._rag_items(method, user, periods, state_period, item, query_vector)
                personalization = self._personalization(method, user, item, history, names)
                rows.append(BenchmarkRow(method.name, item, personalization, gate_threshold=personalization.gate))
        tick = time.perf_counter()
        predictions = self._generate(rows)
        self._timing["generate"] += time.perf_counter() - tick
        tick = time.perf_counter()
        nlls = self._nll(rows) if self.args.nll else [None] * len(rows)
        self._timing["nll"] += time.perf_counter() - tick
        scores = rouge_scores(predictions, [row.item.response for row in rows])
        n_train = len(periods[test_period].train)
        return [
            {
                "method": row.method,
                "user": user,
                "period": test_period,
                "phase": phase,
                "test_id": row.item.id,
                "n_train": n_train,
                "history_items": row.history_items,
                "gate_threshold": row.gate_threshold,
                "prediction": prediction,
                "reference": row.item.response,
                "nll": nll,
                **score,
            }  # fmt: skip
            for row, prediction, nll, score in zip(rows, predictions, nlls, scores, strict=True)
        ]

    def _generate(self, rows: list[BenchmarkRow]) -> list[str]:
        return self._by_wrapper(rows, RowDecoder.generate)

    def _nll(self, rows: list[BenchmarkRow]) -> list[float | None]:
        return self._by_wrapper(rows, RowDecoder.nll)

    def _by_wrapper(self, rows: list[BenchmarkRow], call) -> list:
        """`call(decoder, rows)` with each row decoded through its wrapper: spring-tuned's rows through
        `self.tuned_model`, the others through `self.spring_model`; results in the rows' order."""
        tuned = self._tuned_names()
        out: list = [None] * len(rows)
        for wrapper in (self.spring_model, self.tuned_model):
            own = [i for i, row in enumerate(rows) if (row.method in tuned) == (wrapper is self.tuned_model)]
            if own:
                for i, value in zip(own, call(self._decoder(wrapper), [rows[i] for i in own]), strict=True):
                    out[i] = value
        return out


def run_benchmark(args: BenchmarkArguments, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Runs [`ContinualBenchmark`]`(args, **kwargs)` and saves its results to `args.out` (see [`save_results`]).

    Args:
        args ([`BenchmarkArguments`]): the settings.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over users.
        kwargs: `model`, `tokenizer`, `interactions` for [`ContinualBenchmark`].
    """
    checkpoint = Path(args.out) / "checkpoint.json" if args.resume else None
    results = ContinualBenchmark(args, **kwargs).run(progress=progress, checkpoint=checkpoint)
    save_results(results, args.out)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the results hold everything it did
    return results
