"""The decoding engine of `spring serve`: one thread owns the model and decodes queued requests together.

Requests of different users decode in one `SpringForCausalLM.generate` call, each row with its own adapter, history
and λ (the fused dual path). A request that arrives while a batch decodes joins the next batch (batch-level
scheduling: rows do not join a running batch). Everything that changes the model or the memory (recorded
interactions, period updates, erasure) runs on the same thread between batches, so a new adapter is never swapped in
under a row that is decoding, and no request in flight is dropped.

Per row, [`RowController`] (a stopping criterion) enforces `max_tokens`, `stop` strings, the end-of-turn token and a
client that went away, and hands each new piece of text to the request as it is decoded (streaming). [`RowSampler`]
applies each row's `temperature` / `top_p`; a greedy row (temperature 0) among sampled rows keeps exactly its argmax.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging

from ..generation.adapters import BASE_ADAPTER
from ..generation.personalization import Personalization

logger = logging.get_logger(__name__)


@dataclass
class GenerationJob:
    """One completion request, as the engine decodes it.

    Args:
        input_ids (`list[int]`): the prompt's token ids (chat template applied for chat requests).
        user (`str`, *optional*): whom to personalize for; None (or a user the state does not know): the base model.
        max_tokens (`int`): the most new tokens.
        temperature (`float`): 0 is greedy.
        top_p (`float`): nucleus sampling's mass (1: off).
        seed (`int`, *optional*): a sampled request with a seed decodes alone, after `torch.manual_seed(seed)`, so
            the same request gives the same text.
        stop (`list[str]`): strings that end the completion (not included in it).
        on_event (`callable`, *optional*): called from the engine thread with `("delta", text)` for each new piece of
            text and `("done", None)` at the end.
    """

    input_ids: list[int]
    user: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_event: Callable[[str, Any], None] | None = field(default=None, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # Filled by the engine.
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    personalized: bool = False
    error: BaseException | None = field(default=None, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    submitted_at: float = field(default_factory=time.perf_counter, repr=False)
    first_token_at: float | None = field(default=None, repr=False)

    @property
    def samples(self) -> bool:
        return self.temperature > 0


class RowSampler(LogitsProcessor):
    """Per-row temperature and top-p on the (mixed) scores; a greedy row keeps only its argmax, so sampling it gives
    the token greedy decoding gives."""

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float]):
        self.temperatures = list(temperatures)
        self.top_ps = list(top_ps)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for i, (t, p) in enumerate(zip(self.temperatures, self.top_ps, strict=True)):
            row = scores[i]
            if t <= 0:
                keep = torch.zeros_like(row, dtype=torch.bool)
                keep[int(row.argmax())] = True
                scores[i] = row.masked_fill(~keep, float("-inf"))
                continue
            row = row / t
            if p < 1.0:
                ordered, index = torch.sort(row, descending=True)
                mass = ordered.softmax(-1).cumsum(-1)
                drop = mass - ordered.softmax(-1) >= p  # keep the smallest prefix whose mass reaches p
                row = row.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), float("-inf"))
            scores[i] = row
        return scores


class RowController(StoppingCriteria):
    """Ends each row on its own terms (end-of-turn token, `max_tokens`, a `stop` string, a cancelled request) and
    streams its new text to the job."""

    def __init__(self, jobs: Sequence[GenerationJob], tokenizer: Any, eos_ids: set[int]):
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.finished = [False] * len(self.jobs)
        self._sent = [0] * len(self.jobs)  # characters of each row's text already handed out

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter()
        for i, job in enumerate(self.jobs):
            if self.finished[i]:
                continue
            token = int(input_ids[i, -1])
            if job.first_token_at is None:
                job.first_token_at = now
            if token in self.eos_ids:
                self._finish(i, "stop")
                continue
            job.token_ids.append(token)
            if job.cancelled.is_set():
                self._finish(i, "cancelled")
            elif not self._update_text(i) and len(job.token_ids) >= job.max_tokens:
                self._finish(i, "length")
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)

    def _update_text(self, i: int) -> bool:
        """Decodes row `i`'s text, ends it at a stop string (True when one was found), and streams what is safe to
        send: a stop string may still be forming at the end, and a multi-byte character may be incomplete."""
        job = self.jobs[i]
        text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in job.stop if s and s in text), default=-1)
        if cut >= 0:
            job.text = text[:cut]
            self._finish(i, "stop")
            return True
        job.text = text
        hold = max((len(s) - 1 for s in job.stop), default=0)
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        self._emit(i, safe)
        return False

    def _emit(self, i: int, upto: int) -> None:
        job = self.jobs[i]
        if upto > self._sent[i] and job.on_event is not None:
            job.on_event("delta", job.text[self._sent[i] : upto])
        self._sent[i] = max(self._sent[i], upto)

    def _finish(self, i: int, reason: str) -> None:
        job = self.jobs[i]
        if not job.text and job.token_ids and reason != "stop":
            job.text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        self.finished[i] = True
        job.finish_reason = reason
        self._emit(i, len(job.text))

    def close(self) -> None:
        """Rows still open when `generate` returned (its token budget): decoded and ended with "length"."""
        for i, job in enumerate(self.jobs):
            if not self.finished[i]:
                job.text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
                self._finish(i, "length")


@dataclass
class EngineStats:
    """Counters the `/metrics` endpoint exports."""

    batches: int = 0
    batch_rows: int = 0
    batch_size_counts: dict[int, int] = field(default_factory=dict)
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    commands: int = 0


class ServingEngine:
    """Owns the model on one thread: decodes queued [`GenerationJob`]s in batches and runs state changes between
    batches.

    Args:
        state: the server state (`server.state.ServerState`): its `spring` wrapper decodes; `personalization_for(user)`
            says how a row of that user decodes.
        max_batch_size (`int`, *optional*, defaults to 8): the most rows per batch.
        batch_wait_s (`float`, *optional*, defaults to 0.01): how long the engine waits for more requests once one
            arrived, before it starts a batch.
    """

    def __init__(self, state: Any, max_batch_size: int = 8, batch_wait_s: float = 0.01):
        self.state = state
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_s)
        self.stats = EngineStats()
        self._jobs: queue.Queue[GenerationJob] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending_count = 0
        self._held: collections.deque[GenerationJob] = collections.deque()  # taken, waiting for the next batch

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> ServingEngine:
        self._thread = threading.Thread(target=self._loop, name="spring-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._pending_count

    # ------------------------------------------------------------------------------------------------ submit
    def submit(self, job: GenerationJob) -> GenerationJob:
        """Queues `job`; `job.done` is set when it finished (or failed: `job.error`)."""
        if self._stop.is_set():
            raise RuntimeError("the engine is stopped.")
        with self._lock:
            self._pending_count += 1
        self._jobs.put(job)
        self._wake.set()
        return job

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on the engine thread between batches; returns its future."""
        future: Future = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine is stopped."))
            return future
        self._commands.put((fn, future))
        self._wake.set()
        return future

    # ------------------------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            batch = self._take_batch()
            if batch:
                self._decode(batch)
            elif self._commands.empty():
                self._wake.wait(0.05)
                self._wake.clear()
        self._run_commands()
        while True:  # nothing queued is left hanging at shutdown
            try:
                job = self._held.popleft() if self._held else self._jobs.get_nowait()
            except queue.Empty:
                break
            job.error = RuntimeError("the server is shutting down.")
            self._finish_job(job)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the caller
                future.set_exception(err)
            self.stats.commands += 1

    def _take_batch(self) -> list[GenerationJob]:
        def next_job(timeout: float | None) -> GenerationJob:
            if self._held:
                return self._held.popleft()
            return self._jobs.get(timeout=timeout) if timeout else self._jobs.get_nowait()

        try:
            batch = [next_job(None)]
        except queue.Empty:
            return []
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(next_job(max(deadline - time.perf_counter(), 0.0)))
            except queue.Empty:
                break
        # A seeded sampled request decodes alone (one generator per batch); the others wait, in order, for the next.
        seeded = [job for job in batch if job.samples and job.seed is not None]
        if seeded and len(batch) > 1:
            solo = batch[0] in seeded
            wait = batch[1:] if solo else seeded
            batch = batch[:1] if solo else [job for job in batch if job not in seeded]
            self._held.extendleft(reversed(wait))
        return batch

    def _finish_job(self, job: GenerationJob) -> None:
        with self._lock:
            self._pending_count -= 1
        job.done.set()
        if job.on_event is not None:
            job.on_event("done", None)

    def _decode(self, jobs: list[GenerationJob]) -> None:
        live = [job for job in jobs if not job.cancelled.is_set()]
        for job in jobs:
            if job.cancelled.is_set():
                job.finish_reason = "cancelled"
                self._finish_job(job)
        if not live:
            return
        started = time.perf_counter()
        try:
            self._generate(live)
        except BaseException as err:  # every job of the batch gets the error; the engine keeps serving
            logger.error(f"decoding a batch of {len(live)} failed: {err!r}")
            for job in live:
                job.error = err
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.batch_rows += len(live)
        self.stats.batch_size_counts[len(live)] = self.stats.batch_size_counts.get(len(live), 0) + 1
        for job in live:
            self.stats.generated_tokens += len(job.token_ids)
            self._finish_job(job)

    def _generate(self, jobs: list[GenerationJob]) -> None:
        state = self.state
        spring, tokenizer = state.spring, state.tokenizer
        pad = state.pad_token_id
        width = max(len(job.input_ids) for job in jobs)
        input_ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: decoding appends after the last position
            input_ids[i, width - len(job.input_ids) :] = torch.tensor(job.input_ids, dtype=torch.long)
            attention_mask[i, width - len(job.input_ids) :] = 1
        rows = []
        for job in jobs:
            row = state.personalization_for(job.user)
            job.personalized = row is not None
            rows.append(row if row is not None else Personalization(adapter=BASE_ADAPTER, history=[]))
        controller = RowController(jobs, tokenizer, state.eos_token_ids)
        sampled = any(job.samples for job in jobs)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(job.max_tokens for job in jobs), pad_token_id=pad, top_k=None, top_p=None,
            stopping_criteria=StoppingCriteriaList([controller]), repetition_penalty=None,
        )  # fmt: skip
        if sampled:
            kwargs.update(do_sample=True, temperature=1.0)
            kwargs["logits_processor"] = LogitsProcessorList(
                [RowSampler([job.temperature for job in jobs], [job.top_p for job in jobs])]
            )
            if len(jobs) == 1 and jobs[0].seed is not None:
                torch.manual_seed(jobs[0].seed)
        else:
            kwargs.update(do_sample=False, temperature=None)
        state.before_batch([job.user for job in jobs])
        with torch.no_grad():
            spring.generate(input_ids, attention_mask=attention_mask, personalization=rows, **kwargs)
        controller.close()
