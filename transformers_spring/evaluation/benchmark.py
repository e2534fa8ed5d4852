"""The continual-personalization benchmark: the SPRInG paper's temporal protocol, its baselines and ablations, on
one model, one set of users and one split."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria
from transformers.utils import logging

from ..data import read_news_jsonl
from ..generation.adapters import BASE_ADAPTER
from ..memory.encoders import normalize_rows
from ..memory.gate import RelevanceGate
from ..persistence.atomic import atomic_write_text
from ..records import Interaction
from .benchmark_config import BenchmarkArguments
from .methods import MethodSpec, earlier_training_items, floor_prediction, rag_items, resolve_methods
from .metrics import rouge_scores
from .report import rebuild_report

logger = logging.get_logger(__name__)


def load_interactions(args: BenchmarkArguments) -> list[Interaction]:
    """Reads `args.data` in its format (see [`BenchmarkArguments.data_format`])."""
    from ..data import read_interactions_jsonl, read_lamp

    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"`data` file not found: {path}")
    fmt = args.data_format
    if fmt == "auto":
        if path.suffix == ".json":
            fmt = "lamp"
        else:
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "{}")
            try:
                keys = set(json.loads(first))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"`data` {path}: the first line is not a JSON object ({err}).") from err
            fmt = "news" if {"headline", "authors"} <= keys else "jsonl"
    if fmt == "news":
        return read_news_jsonl(path)
    if fmt == "jsonl":
        return read_interactions_jsonl(path)
    return read_lamp(path, args.lamp_outputs, task=args.lamp_task, include_queries=bool(args.lamp_queries))


@dataclass
class _Row:
    """One generation: a test item decoded by one method."""

    method: str
    item: Interaction
    adapter: str
    history: list = field(default_factory=list)
    weight: float = 0.0
    gate_threshold: float | None = None  # σ the buffer items were gated with (SPRInG rows)
    prediction: str | None = None  # set up front for floors, which need no model


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

    def _splits(self) -> dict[str, list]:
        from ..data import group_by_user, select_users, temporal_split

        args = self.args
        items = self.interactions if self.interactions is not None else load_interactions(args)
        least = 2 * args.num_periods  # the fewest items that give every period a training and a held-out item
        # A text-only item (a LaMP-7 tweet) has no input of its own: it trains and is history, and is never tested.
        split = dict(test_fraction=args.test_fraction, testable=_is_testable)
        splits = temporal_split(items, args.num_periods, min_items=max(args.min_items, least), **split)
        # Users are picked on their full counts (so "stratified" spans heavy and light users), then capped.
        chosen = select_users(splits, args.users, strategy=args.user_selection, seed=args.seed)
        if args.max_items:  # each chosen user's most recent N items of the raw stream, split again
            streams = group_by_user(items)
            recent = []
            for user in chosen:
                recent += sorted(streams[user], key=lambda it: it.timestamp)[-args.max_items :]
            splits = temporal_split(recent, args.num_periods, min_items=least, **split)
        return {user: splits[user] for user in chosen}

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
            val = [it for it in train[-n_val:] if _is_testable(it)]
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
                nlls += self._nll([_Row("select", item, name) for item in val])
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

    # ------------------------------------------------------------------------------------------------ checkpoint
    def _fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must match to be continued (where output goes and thread counts don't count)."""
        config = dataclasses.asdict(self.args)
        for key in ("out", "threads", "resume"):
            config.pop(key, None)
        return config

    def _identity(self, splits: dict[str, list]) -> dict[str, str]:
        """What else a checkpoint must match: the model and the exact split (users, item ids, times and texts), so
        that an edited data file or another model object is not continued."""
        digest = hashlib.sha256()
        for user, periods in splits.items():
            for period in periods:
                for part, items in (("train", period.train), ("test", period.test)):
                    for it in items:
                        fields = (user, str(period.period), part, it.id, repr(it.timestamp), it.prompt, it.response)
                        digest.update("\x1f".join(fields).encode("utf-8", "surrogatepass") + b"\x1e")
        config = getattr(self.model, "config", None)
        model = getattr(config, "_name_or_path", "") or str(self.args.model)
        return {"split_sha256": digest.hexdigest(), "model": model}

    def _matches(self, saved: Any) -> bool:
        """Whether a checkpoint's settings are this run's. A setting the checkpoint lacks (added by a later version
        of the package) matches when it is at its default."""
        if not isinstance(saved, dict):
            return False
        defaults = dataclasses.asdict(BenchmarkArguments(preset=self.args.preset))  # preset-resolved defaults
        current = self._fingerprint()
        return all(
            saved[key] == value if key in saved else value == defaults.get(key, object())
            for key, value in current.items()
        ) and set(saved) <= set(current)

    def _load_checkpoint(self, path: Path | None, identity: dict[str, str]) -> dict[str, Any] | None:
        if path is None or not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning(f"ignoring the unreadable benchmark checkpoint {path} ({err}); starting over.")
            return None
        if not isinstance(state, dict) or not self._matches(state.get("fingerprint")):
            logger.warning(f"the benchmark checkpoint {path} was made with other settings; starting over.")
            return None
        if "identity" not in state:  # written before checkpoints recorded it: the settings matched, so continue
            logger.warning(f"the benchmark checkpoint {path} records no model/data identity; continuing it.")
            state["identity"] = identity
        elif state["identity"] != identity:
            logger.warning(f"the benchmark checkpoint {path} was made with another model or data; starting over.")
            return None
        return state

    def _tick(self, state: dict[str, Any]) -> None:
        """Adds the wall time since the last tick to the run's total (which a checkpoint carries across stops)."""
        now = time.perf_counter()
        state["elapsed_s"] += now - self._clock
        self._clock = now

    def _save_checkpoint(self, path: Path | None, state: dict[str, Any]) -> None:
        self._tick(state)
        if path is None:
            return
        state["gate_scores"] = self._gate.observed().tolist()
        state["timing_s"] = dict(self._timing)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(state, ensure_ascii=False))

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
            prediction, reference, scores, NLL), `summary` (see [`summarize`]) and `bootstrap`.
        """

        args = self.args
        self._clock = time.perf_counter()
        self._progress = progress
        if args.threads:
            torch.set_num_threads(args.threads)
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        splits = self._splits()
        self._load_model()
        identity = self._identity(splits)
        state = self._load_checkpoint(checkpoint, identity)
        resumed = state is not None
        state = state or {
            "fingerprint": self._fingerprint(), "identity": identity, "done": [], "records": [], "elapsed_s": 0.0,
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
                self._save_checkpoint(checkpoint, state)
            chosen = state["selection"]["chosen"]
            spring_args, plain_args = training_args[(chosen["learning_rate"], chosen["num_train_epochs"])]
            done = set(state["done"])
            for user in tqdm(list(splits), desc="users", disable=not progress):
                if user in done:
                    continue
                state["records"] += self._run_user(user, splits[user], spring_args, plain_args)
                state["done"].append(user)
                self._save_checkpoint(checkpoint, state)
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
        return rebuild_report(results)  # summary, bootstrap and drift tables: one code path with `spring report`

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
        self.memory = LoGoMemory(
            wrap_encoder(encoder) if wrap_encoder else encoder, scorer="bm25", gate=None, bm25_idf=args.bm25_idf,
            buffer_size=max(args.buffer_size, 1), dedup_threshold=None, **memory_kwargs,
        )  # fmt: skip
        self.memory.add_many(train_items)
        self.spring_model = SpringForCausalLM(
            self.peft_model, memory=self.memory, tokenizer=self.tokenizer,
            config=SpringConfig(
                interpolation_weight=args.interpolation_weight, top_k=args.spring_k,
                history_item_template=args.history_item_template,
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

    # ------------------------------------------------------------------------------------------------ per user
    def _needed_adapters(self) -> set[str]:
        return {m.adapter for m in self.methods if m.adapter is not None}

    def _train(self, args, user: str, period: int, items, name: str, memory=None) -> None:
        from transformers import PrinterCallback, ProgressCallback

        from ..training import SpringTrainer

        tick = time.perf_counter()
        trainer = SpringTrainer(
            model=self.peft_model, args=args, user_id=user, period=period, train_interactions=list(items),
            memory=memory, processing_class=self.tokenizer, score_cache=self.score_cache, adapter_name=name,
        )  # fmt: skip
        for callback in (PrinterCallback, ProgressCallback):  # the benchmark has its own progress bar
            trainer.remove_callback(callback)
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
        from ..training import adapter_name_for

        args = self.args
        needed = self._needed_adapters()
        stem = adapter_name_for(user)
        names = {kind: f"{stem}__{kind}" for kind in ("spring", "all100", "random30", "oppu_each")}
        rng = random.Random(f"{args.seed}:{user}")
        records: list[dict[str, Any]] = []
        try:
            # Period 0: one adapter on all of it, the common starting point of every continual LoRA chain (every
            # method reading SPRInG's buffer decodes with the "spring" chain, so `needed` covers them too).
            if needed - {"oppu_each"}:
                self._train(spring_args, user, 0, periods[0].train, names["spring"], self.memory)
                for kind in ("all100", "random30"):
                    if kind in needed:
                        self._copy_adapter(names["spring"], names[kind], spring_args)
            for t in range(1, len(periods)):
                train = periods[t].train
                if "spring" in needed:
                    self._train(spring_args, user, t, train, names["spring"], self.memory)
                    self._observe_gate(user, train)
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

    def _buffer_items(self, method: MethodSpec, user: str, item: Interaction) -> tuple[list, float | None]:
        use_global = method.retrieval == "buffer+global"
        context = self.memory.retrieve_context(
            user, item.prompt, k=self.args.spring_k, region="buffer", use_global=use_global,
            before=item.timestamp if use_global else None,
        )  # fmt: skip
        items = list(context.items)
        sigma = self._sigma() if method.gate else None
        if sigma is not None:  # Eq. 5 on the buffer's BM25 scores; global items are cosines, the mediator's business
            items = [it for it in items if it.source != "local" or RelevanceGate.passes(it.score, sigma)]
        return items, sigma

    # ------------------------------------------------------------------------------------------------ decoding
    def _evaluate(self, user: str, periods, test_period: int, state_period: int, names, phase: str):
        rows: list[_Row] = []
        dense = any(m.retrieval == "dense" for m in self.methods)
        for item in periods[test_period].test:
            query_vector = None
            if dense:  # once per test item, shared by the dense "each" and "accum" baselines
                query_vector = normalize_rows(self.memory.encoder.encode([item.prompt]), "query embedding")[0]
            for method in self.methods:
                if method.is_floor:
                    # Floors read the test period's and earlier training items only, in both phases.
                    floor = floor_prediction(method.floor, earlier_training_items(periods, test_period, item), item)
                    rows.append(_Row(method.name, item, BASE_ADAPTER, prediction=floor))
                    continue
                adapter = names[method.adapter] if method.adapter else BASE_ADAPTER
                history, sigma = [], None
                if method.retrieval in ("bm25", "dense"):
                    history = self._rag_items(method, user, periods, state_period, item, query_vector)
                elif method.retrieval is not None:
                    history, sigma = self._buffer_items(method, user, item)
                weight = method.mixture_weight(self.args.interpolation_weight)
                rows.append(_Row(method.name, item, adapter, history, weight, sigma))
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
                "history_items": len(row.history),
                "gate_threshold": row.gate_threshold,
                "prediction": prediction,
                "reference": row.item.response,
                "nll": nll,
                **score,
            }  # fmt: skip
            for row, prediction, nll, score in zip(rows, predictions, nlls, scores, strict=True)
        ]

    def _unique_model_rows(self, rows: list[_Row]) -> tuple[list[int], list[int]]:
        """Rows that need the model, deduplicated: methods that decode an item identically (the same adapter,
        history and λ: e.g. OPPU accum and All-100 %, or SPRInG with and without the gate when the gate drops
        nothing) share one generation and one likelihood. Returns `(order, source)`: the distinct rows to compute,
        sorted by history length (less padding per batch), and for every row the index whose result it takes."""
        first_of: dict[tuple, int] = {}
        source = [i if row.prediction is not None else first_of.setdefault(_decoding_key(row), i) for i, row in
                  enumerate(rows)]  # fmt: skip
        order = sorted(first_of.values(), key=lambda i: len(rows[i].history))
        return order, source

    def _batches(self, rows: list[_Row], order: list[int]):
        """`(chunk, tokenized prompts, personalization)` per `generation_batch_size` rows of `order`."""
        from ..generation import Personalization

        for start in range(0, len(order), self.args.generation_batch_size):
            chunk = order[start : start + self.args.generation_batch_size]
            prompts = [self._formatter.prompt_text(rows[i].item) for i in chunk]
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(self.peft_model.device)
            personalization = [
                Personalization(user=rows[i].adapter, history=rows[i].history, weight=rows[i].weight) for i in chunk
            ]
            yield chunk, inputs, personalization

    def _stopping_criteria(self):
        from transformers import StoppingCriteriaList

        if self._line_end_tokens is None:
            return None
        return StoppingCriteriaList([LineEndCriteria(self._line_end_tokens)])

    def _generate(self, rows: list[_Row]) -> list[str]:
        args = self.args
        order, source = self._unique_model_rows(rows)
        outputs: dict[int, str] = {i: row.prediction for i, row in enumerate(rows) if row.prediction is not None}
        for chunk, inputs, personalization in self._batches(rows, order):
            with torch.no_grad():
                out = self.spring_model.generate(
                    **inputs, personalization=personalization, max_new_tokens=self._budget, do_sample=False,
                    repetition_penalty=args.repetition_penalty, pad_token_id=self._formatter.pad_token_id,
                    stopping_criteria=self._stopping_criteria(), temperature=None, top_p=None, top_k=None,
                )  # fmt: skip
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                outputs[i] = first_line(text)
        return [outputs[i] for i in source]

    def _nll(self, rows: list[_Row]) -> list[float | None]:
        """Per-token NLL of each row's gold response (the training target: the text and its end-of-turn marker)
        under exactly what the row decodes with: [`SpringForCausalLM.score`]. None for floors."""
        order, source = self._unique_model_rows(rows)
        values: dict[int, float | None] = {i: None for i, row in enumerate(rows) if row.prediction is not None}
        for chunk, inputs, personalization in self._batches(rows, order):
            targets = []
            for i in chunk:
                sample = self._formatter.encode(rows[i].item)
                targets.append(list(sample.input_ids[sample.prompt_length :]))
            logprobs = self.spring_model.score(
                inputs["input_ids"], targets, inputs["attention_mask"], personalization=personalization
            )
            for i, row_logprobs in zip(chunk, logprobs, strict=True):
                values[i] = float(-row_logprobs.mean())
        return [values[i] for i in source]


def _is_testable(item: Interaction) -> bool:
    return not item.metadata.get("text_only")


def _decoding_key(row: _Row) -> tuple:
    """What a row's generation depends on: the item, the adapter, the history (in order) and λ."""
    history = tuple((hit.interaction.id, hit.source) for hit in row.history)
    return row.item.id, row.item.prompt, row.adapter, history, row.weight


def first_line(text: str) -> str:
    """The first non-empty line of a generation (a headline is one line), without surrounding quotes."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


def line_end_tokens(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every token id: whether its text holds a line break, whether it has visible text before that break,
    and whether it has visible text at all (the inputs of [`LineEndCriteria`]). Decodes the vocabulary once."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ends = torch.tensor(["\n" in text for text in texts])
    visible_before = torch.tensor([bool(text.split("\n", 1)[0].strip()) for text in texts])
    visible = torch.tensor([bool(text.strip()) for text in texts])
    return ends, visible_before, visible


class LineEndCriteria(StoppingCriteria):
    """Stops a row at the line break that ends the first line with visible text (leading blank lines do not count,
    so a model that starts with a newline still gets its line). Needs nothing of the tokenizer but `batch_decode`
    (see [`line_end_tokens`]), so it works with any vocabulary, word-level ones included. Build one per `generate`
    call: it remembers, per row, whether visible text came already.

    Args:
        tokens (`tuple` of three `torch.BoolTensor`): what [`line_end_tokens`] returns for the tokenizer.
    """

    def __init__(self, tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        self.ends, self.visible_before, self.visible = tokens
        self.seen: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].cpu()
        seen = self.seen if self.seen is not None else torch.zeros(len(last), dtype=torch.bool)
        stop = self.ends[last] & (seen | self.visible_before[last])
        self.seen = seen | self.visible[last]
        return stop.to(input_ids.device)


def decoding_budget(tokenizer: Any, train_items: Sequence[Interaction], quantile: float = 0.95) -> int:
    """The token budget of generation: the `quantile` of the training responses' lengths in tokens, plus one for
    the line end or end-of-turn token. Only training items may set it, never test items."""
    if not train_items:
        raise ValueError("the decoding budget needs training items; got none.")
    lengths = [len(tokenizer(item.response, add_special_tokens=False)["input_ids"]) + 1 for item in train_items]
    return max(1, math.ceil(float(np.quantile(np.asarray(lengths), quantile))))


def save_results(results: dict[str, Any], out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Writes `results.json`, `results.md` (the table), LaMP-format predictions (`lamp/<method>.json` and
    `lamp/golds.json`, for LaMP's own `eval_task.py`) and, with matplotlib, `rouge_l_per_period.png` into
    `out_dir` (each file atomically). Returns the paths written."""
    from .report import lamp_golds, lamp_predictions, markdown_table, plot_rouge_l

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(paths["markdown"], markdown_table(results) + "\n")
    task = (results.get("config") or {}).get("lamp_task") or "LaMP_4"
    (out / "lamp").mkdir(exist_ok=True)
    paths["lamp_golds"] = atomic_write_text(out / "lamp" / "golds.json", json.dumps(lamp_golds(results, task)))
    for method in results.get("methods", []):
        atomic_write_text(out / "lamp" / f"{method}.json", json.dumps(lamp_predictions(results, method, task)))
    if plot:
        paths["plot"] = plot_rouge_l(results, out / "rouge_l_per_period.png")
    return paths


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
