"""`spring train`: SPRInG on your own user stream, period by period, into a state folder that resumes after a stop and
that [`SpringForCausalLM.from_pretrained`] and `spring serve` load."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging as pylogging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..data.tasks import PRESETS, detect_format, read_stream
from ..generation.config import SpringConfig
from ..memory.gate import RelevanceGate
from ..persistence.continual_state import STATE_FILE, read_train_job, write_train_job
from ..records import Interaction
from .spring_config import SpringTrainingArguments
from .train_job_config import TrainJobArguments, fingerprint

logger = logging.get_logger(__name__)

DEFAULT_PROMPT_TEMPLATE = "{prompt}"


def interactions_digest(items: Sequence[Interaction]) -> str:
    """The SHA-256 of what a run trains on: every interaction's user, id, time, prompt and response in a canonical
    order (so the same stream read from another file, or given in Python, has the same digest)."""
    sha = hashlib.sha256()
    for item in sorted(items, key=lambda it: (it.user_id, it.timestamp, it.id)):
        sha.update(json.dumps([item.user_id, item.id, item.timestamp, item.prompt, item.response]).encode("utf-8"))
        sha.update(b"\n")
    return sha.hexdigest()


def resolve_preset(job: TrainJobArguments) -> str:
    """The task preset a job uses: `job.preset`, or for `"auto"` the data's own (`"news"` for the News Category
    format, the LaMP task for a LaMP file), else `"none"` (the prompt is the whole user message).

    Args:
        job ([`TrainJobArguments`] or [`TuningArguments`]): the job (its `data` file is read for `"auto"`; a job
            without a `preset` field is `"auto"`).
    """
    preset = getattr(job, "preset", "auto")
    if preset != "auto":
        return preset
    fmt = job.data_format if job.data_format != "auto" else detect_format(job.data)
    if fmt == "news":
        return "news"
    if fmt == "lamp":
        from ..data.lamp import normalize_task, read_outputs

        lamp_task, lamp_outputs = getattr(job, "lamp_task", None), getattr(job, "lamp_outputs", None)
        task = lamp_task or (read_outputs(Path(lamp_outputs))[0] if lamp_outputs else None)
        task = normalize_task(task) if task else None
        return task if task in PRESETS else "none"
    return "none"


def pick_users(items: Sequence[Interaction], job: Any) -> list[Interaction]:
    """The interactions of `job.users` (every user when empty) inside the job's `since`/`until` window, if it has
    one; an unknown user is an error with the closest known ids (a typo is the usual cause). Shared by `spring train`
    and `spring tune`.

    Args:
        items (`Sequence[Interaction]`): the stream.
        job ([`TrainJobArguments`] or [`TuningArguments`]): its `user_list`, `data` and optional `window`.
    """
    items = list(items)
    since, until = getattr(job, "window", (None, None))
    if since is not None or until is not None:
        items = [
            it for it in items if (since is None or it.timestamp >= since) and (until is None or it.timestamp < until)
        ]
    wanted = job.user_list
    if not wanted:
        return items
    known = list(dict.fromkeys(it.user_id for it in items))
    known_set = set(known)
    missing = [user for user in wanted if user not in known_set]
    if missing:
        hints = {user: difflib.get_close_matches(user, known, n=3) for user in missing}
        where = " in the `since`/`until` window" if since is not None or until is not None else ""
        raise ValueError(f"`users`: no interactions for {missing}{where} in {job.data}; closest ids: {hints}.")
    chosen = set(wanted)
    return [it for it in items if it.user_id in chosen]


def user_periods(
    items: Sequence[Interaction], num_periods: int, min_items: int, where: str, use: str
) -> tuple[dict[str, list], list[str]]:
    """Each user's stream cut by time into `num_periods` periods, nothing held out ([`temporal_split`]); users with
    fewer than `min_items` (0: `num_periods`) interactions are skipped, by name, with one warning. The one cut of
    `spring train` and `spring tune`.

    Args:
        items (`Sequence[Interaction]`): the stream.
        num_periods (`int`): periods per user.
        min_items (`int`): the fewest interactions a user needs (0: `num_periods`).
        where (`str`): where the items come from, for the error message (e.g. `"in my.jsonl"`).
        use (`str`): what skipped users are not, for the warning (e.g. `"trained"`).

    Returns:
        `(splits, skipped)`: per user the [`PeriodSplit`]s, and the skipped users (sorted).

    Raises:
        `ValueError`: no user has enough interactions (naming `num_periods` and `min_items`).
    """
    from ..data import temporal_split

    least = min_items or num_periods
    splits = temporal_split(items, num_periods, test_fraction=0.0, min_items=least)
    skipped = sorted({it.user_id for it in items} - set(splits))
    if skipped:
        logger.warning(f"{len(skipped)} user(s) have fewer than {least} interactions and are not {use}: "
                       f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}")  # fmt: skip
    if not splits:
        raise ValueError(
            f"no user {where} has at least {least} interactions (`num_periods`={num_periods}, `min_items`="
            f"{min_items}); lower `num_periods` or `min_items`, or pass more data."
        )
    return splits, skipped


# Fingerprint keys added after a release, with the value every run of that release had: a `train_job.json` that
# lacks one still resumes when today's value is that one.
FINGERPRINT_ADDED_KEYS = {"adaptive_weight": 0.0}


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """The (dotted) keys whose values differ between two job fingerprints."""
    keys = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if not prefix and key not in saved and key in FINGERPRINT_ADDED_KEYS:
            old = FINGERPRINT_ADDED_KEYS[key]
        if isinstance(old, dict) and isinstance(new, dict):
            keys += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            keys.append(f"{prefix}{key}")
    return keys


def _saved_settings(saved: dict, changed: list[str]) -> str:
    """The saved values of the differing training settings (e.g. after the defaults changed: the `"measured"`
    preset's learning_rate "auto" and every sample, where an earlier release used 3e-3 and 30 %)."""
    values = []
    for key in changed:
        section, _, name = key.partition(".")
        if section in ("training_args", "spring_args") and name and "." not in name:
            values.append(f"{name}={saved.get(section, {}).get(name)!r}")
    return f" (saved: {', '.join(values)})" if values else ""


def _load_model(name: str):
    from ..utils import load_causal_lm, load_smollm2

    return load_smollm2() if name == "smollm2" else load_causal_lm(name)


def buffer_gate(
    memory: Any, streams: dict[str, Sequence[Interaction]], top_k: int, quantile: float, region: str = "buffer"
) -> float | None:
    """σ, the relevance gate (paper Eq. 5, σ = Q3 by default): the `quantile` of the BM25 scores that the users' own
    training prompts get against their final residual buffers (the top `top_k` hits, each item's own buffer entry
    excluded), or None without any score. `spring bench` pools the same kind of scores online, period by period;
    here they are computed once, on the trained state, and saved as `SpringConfig.gate`.

    Args:
        memory (`LoGoMemory`): the trained memory (buffers in their pinned region).
        streams (`dict[str, Sequence[Interaction]]`): per user, the training items whose prompts are scored.
        top_k (`int`): the items retrieved per query (`SpringConfig.top_k`).
        quantile (`float`): the quantile of the pooled scores.
        region (`str`, *optional*, defaults to `"buffer"`): where the history path retrieves from (the scores are
            of that region: σ must compare like with like).
    """
    gate = RelevanceGate("auto", quantile=quantile, min_observations=1, window=10**12)
    for user, items in streams.items():
        for item in items:
            region_kwargs = {} if region == "all" else {"region": region}
            hits = memory.retrieve_context(user, item.prompt, k=top_k + 1, use_global=False, **region_kwargs).items
            gate.observe([hit.score for hit in hits if hit.interaction.id != item.id][:top_k])
    threshold = gate.current_threshold()
    return None if threshold is None else float(threshold)


class _DropInPlaceNotice(pylogging.Filter):
    """Drops ContinualPersonalizer's "modifies the model you pass in place" warning in this thread only."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: pylogging.LogRecord) -> bool:
        return threading.get_ident() != self.thread or not str(record.msg).startswith(
            "ContinualPersonalizer modifies the model you pass in place"
        )


@contextlib.contextmanager
def _quiet_in_place_notice(owned: bool):
    """Silences ContinualPersonalizer's in-place warning while it is built around a model the job loaded itself
    (nobody else holds it); a caller's own model, and every other thread, still get it."""
    from . import continual

    quiet = _DropInPlaceNotice() if owned else None
    if quiet is not None:
        continual.logger.addFilter(quiet)
    try:
        yield
    finally:
        if quiet is not None:
            continual.logger.removeFilter(quiet)


def run_train_job(
    job: TrainJobArguments,
    training_args: SpringTrainingArguments,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    interactions: Sequence[Interaction] | None = None,
    encoder: Any = None,
) -> dict[str, Any]:
    """
    Trains every chosen user's SPRInG adapter period by period and saves the state in `job.out`, a checkpoint after
    each user. A run stopped at any point resumes from its last checkpoint when started again with the same data
    and settings (announced with a warning); users already trained are not trained again.

    Each user's stream (oldest first) is cut into `job.num_periods` consecutive periods of near-equal size
    ([`temporal_split`] with nothing held out); period 0 trains the adapter on every item, later periods on their
    drift-selected items, and the residual buffer is rebuilt after each. Every trained item is also added to the
    user's memory history, unshared (nothing reaches a global memory unless you opt users in with
    `memory.set_sharing`). At the end, σ (the relevance gate) is set as the benchmark sets it ([`buffer_gate`]) and
    saved with the decoding settings (`interpolation_weight`, `top_k`, the preset's history template, retrieval from
    the buffer, no global memory).

    Args:
        job ([`TrainJobArguments`]): the data, users, periods and output folder.
        training_args ([`SpringTrainingArguments`]): SPRInG's training settings. When its `prompt_template` is the
            default `"{prompt}"`, the task preset's is used (and saved).
        model (`PreTrainedModel`, *optional*): the base model; loaded from `job.model` when omitted. It gets the
            users' LoRA adapters in place (see [`ContinualPersonalizer`]).
        tokenizer (*optional*): its tokenizer (required with `model`).
        interactions (`Sequence[Interaction]`, *optional*): the stream; read from `job.data` when omitted (the file's
            digest still guards the resume when it exists).
        encoder (*optional*): the memory's encoder (default: `job.encoder`).

    Returns:
        `dict`: `out`, `preset`, `users` (per user: `periods`, `items`, `selected` per period trained in this run,
        `buffer`), `resumed_users` (trained by an earlier run), `skipped_users` (too few items), `gate` (σ),
        `learning_rate_choice` (how `learning_rate="auto"` was resolved, see [`ContinualPersonalizer`]; None for a
        float learning rate) and `seconds`.

    Raises:
        `ValueError`: a bad record (file, line and field), an unknown `users` id, no user with enough items, or an
        `out` folder holding another run (the differing settings are named).
    """
    from tqdm.auto import tqdm

    from ..memory import HashingEncoder, LoGoMemory, resolve_encoder
    from .continual import ContinualPersonalizer

    started = time.perf_counter()
    if not isinstance(job, TrainJobArguments):
        raise TypeError(f"`job` must be a TrainJobArguments, got {type(job).__name__}.")
    if not isinstance(training_args, SpringTrainingArguments):
        raise TypeError(f"`training_args` must be a SpringTrainingArguments, got {type(training_args).__name__}.")
    if (model is None) != (tokenizer is None):
        raise ValueError("pass `model` and `tokenizer` together (or neither, to load `job.model`).")
    if job.threads:
        torch.set_num_threads(job.threads)
    from ..records import coerce_interactions

    data_path = Path(job.data)
    if interactions is None:  # the readers check every record (and a JSONL file's ids, by line)
        interactions = read_stream(
            data_path, job.data_format, lamp_outputs=job.lamp_outputs, lamp_task=job.lamp_task,
            lamp_queries=job.lamp_queries,
        )  # fmt: skip
    else:  # checked whole before anything is written (a repeated id would otherwise stop the run after some users)
        interactions = coerce_interactions(interactions, name="interactions")
    preset = resolve_preset(job) if data_path.is_file() or job.preset != "auto" else "none"
    if preset != "none" and training_args.prompt_template == DEFAULT_PROMPT_TEMPLATE:
        training_args.prompt_template = PRESETS[preset].prompt_template
    items = pick_users(interactions, job)
    window = " in the `since`/`until` window" if job.since or job.until else ""
    splits, skipped = user_periods(items, job.num_periods, job.min_items, f"in {job.data}{window}", "trained")
    out = Path(job.out)
    job = job.with_decoding_preset(training_args.spring_preset)  # the unset decoding settings, as the preset says
    job_print = fingerprint(job, interactions_digest(items), training_args)
    saved_job = read_train_job(out) if out.is_dir() else None
    has_state = (out / STATE_FILE).is_file()

    if has_state or saved_job is not None:
        if not job.resume:
            raise ValueError(
                f"`out` {out} already holds a `spring train` run; pass --resume true to continue it, or a new --out."
            )
        if saved_job is None:
            raise ValueError(f"`out` {out} holds a ContinualPersonalizer state that `spring train` did not write (no "
                             "train_job.json); pass a new --out.")  # fmt: skip
        changed = _differences(saved_job, job_print)
        if changed:
            raise ValueError(
                f"`out` {out} holds a run with other data or settings ({', '.join(changed)} differ); continue it with "
                f"the same ones{_saved_settings(saved_job, changed)}, or pass a new --out."
            )
    owned = model is None  # a model the job loads itself: no caller keeps a reference that in-place wrapping changes
    if owned:  # (after the checks above: a refused run downloads nothing)
        model, tokenizer = _load_model(job.model)
    if saved_job is None:
        out.mkdir(parents=True, exist_ok=True)
        write_train_job(out, job_print)

    if has_state:
        with _quiet_in_place_notice(owned):
            personalizer = ContinualPersonalizer.from_pretrained(
                model, out, tokenizer, training_args, max_resident_adapters=job.max_resident_adapters,
                memory_kwargs={"encoder": encoder} if encoder is not None else None,
            )  # fmt: skip
        done = [user for user, periods in splits.items() if personalizer.period(user) >= len(periods)]
        logger.warning(
            f"Resuming the `spring train` run in {out}: {len(done)} of {len(splits)} user(s) already trained; "
            f"continuing with the other {len(splits) - len(done)}."
        )
    else:
        if encoder is None:
            encoder = HashingEncoder(256) if job.encoder == "hashing" else resolve_encoder(None)
        memory = LoGoMemory(
            encoder, scorer="bm25", gate=None, bm25_idf="lucene", buffer_size=max(training_args.buffer_size, 1),
            dedup_threshold=None, use_global=False, share_by_default=False,
        )  # fmt: skip
        spring_config = SpringConfig(
            interpolation_weight=job.interpolation_weight, top_k=job.top_k, retrieval_region=job.retrieval_region,
            spring_preset=training_args.spring_preset,
            use_global=False, copy_weight=job.copy_weight, adaptive_weight=job.adaptive_weight,
            **({"history_item_template": PRESETS[preset].history_item_template} if preset != "none" else {}),
        )  # fmt: skip
        with _quiet_in_place_notice(owned):
            personalizer = ContinualPersonalizer(
                model, tokenizer, training_args, memory, spring_config=spring_config,
                max_resident_adapters=job.max_resident_adapters,
            )  # fmt: skip
        done = []

    report: dict[str, Any] = {"out": str(out), "preset": preset, "users": {}, "resumed_users": done,
                              "skipped_users": skipped}  # fmt: skip
    finished = set(done)
    todo = [user for user in splits if user not in finished]
    bar = tqdm(todo, desc="spring train", unit="user", dynamic_ncols=True)
    for user in bar:
        periods = splits[user]
        entry = report["users"][user] = {"periods": len(periods), "items": sum(len(p.train) for p in periods),
                                         "selected": []}  # fmt: skip
        for split in periods[personalizer.period(user) :]:
            bar.set_postfix_str(f"{user[:24]} period {split.period + 1}/{len(periods)}")
            personalizer.memory.add_many(split.train)
            output = personalizer.observe(user, split.train)
            entry["selected"].append(len(output.selected_ids))
            logger.info(f"user {user!r} period {split.period}: {len(split.train)} new, "
                        f"{len(output.selected_ids)} trained on, buffer {len(output.buffer_ids)}.")  # fmt: skip
        entry["buffer"] = len(personalizer.memory.buffer(user))
        personalizer.save_pretrained(out)  # the checkpoint a stopped run resumes from
    bar.close()

    # The prompts of the update periods (1 and later), as the benchmark pools them; period 0 when there is no other.
    streams = {
        user: [it for split in (periods[1:] or periods) for it in split.train] for user, periods in splits.items()
    }
    sigma = None
    if job.gate == "quantile":
        sigma = buffer_gate(personalizer.memory, streams, job.top_k, job.gate_quantile, job.retrieval_region)
    config = personalizer.spring_config or SpringConfig(adapter_name_template=personalizer.adapter_name_template)
    personalizer.spring_config = dataclasses.replace(config, gate=sigma)
    personalizer.save_pretrained(out)
    report["gate"] = sigma
    report["learning_rate_choice"] = personalizer.learning_rate_choice
    report["seconds"] = time.perf_counter() - started
    return report
