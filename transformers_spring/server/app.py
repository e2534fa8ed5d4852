"""The HTTP API of `spring serve` (FastAPI): OpenAI's `/v1/chat/completions` and `/v1/completions`, plus
`/v1/interactions`, `/v1/users/{user}`, `/health` and `/metrics`.

Every error is an OpenAI-style JSON body, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for a
bad request (unknown or malformed fields, a body or prompt over the limits, a wrong key, another user's key).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.utils import logging

from ..records import Interaction, check_user_id
from .auth import ApiKeys
from .engine import GenerationJob, ServingEngine

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error")  # fmt: skip


def _error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


# ---------------------------------------------------------------------------------------------------- schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported.", f"messages.content[{i}]")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    # Fields of OpenAI's schema this server does not implement: accepted only at their defaults.
    @field_validator("n", "frequency_penalty", "presence_penalty", "logprobs", "logit_bias")
    @classmethod
    def _only_the_default(cls, value, info):
        default = cls.model_fields[info.field_name].default
        if value != default and not (default is None and not value):
            raise ValueError(f"only {default!r} is supported")
        return value

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences.", "stop")
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


class InteractionRequest(_Strict):
    user: str
    prompt: str
    response: str
    timestamp: float | str | None = None
    metadata: dict[str, Any] | None = None
    id: str | None = None


# ---------------------------------------------------------------------------------------------------- limits
@dataclass
class ServeLimits:
    """Size limits (each a 4xx when exceeded)."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_concurrent_streams: int = 64
    max_queue: int = 256


# ---------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Counters in the Prometheus text format."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.started = time.time()

    def count(self, path: str, status: int) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def render(self, engine: ServingEngine, streams: int) -> str:
        stats, state = engine.stats, engine.state
        sizes = _snapshot(stats.batch_size_counts)  # (the engine thread changes them meanwhile)
        pending = sum(len(v) for v in _snapshot(state.pending).values())
        lines = [
            "# HELP spring_requests_total HTTP requests by path and status.",
            "# TYPE spring_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'spring_requests_total{{path="{path}",status="{status}"}} {n}')
        uptime = max(time.time() - self.started, 1e-9)
        lines += [
            "# TYPE spring_generated_tokens_total counter", f"spring_generated_tokens_total {stats.generated_tokens}",
            "# HELP spring_tokens_per_second Generated tokens per second of decoding time.",
            "# TYPE spring_tokens_per_second gauge",
            f"spring_tokens_per_second {stats.generated_tokens / max(stats.decode_seconds, 1e-9):.3f}",
            "# TYPE spring_decode_seconds_total counter", f"spring_decode_seconds_total {stats.decode_seconds:.3f}",
            "# TYPE spring_batches_total counter", f"spring_batches_total {stats.batches}",
            "# TYPE spring_batch_rows_total counter", f"spring_batch_rows_total {stats.batch_rows}",
            "# HELP spring_batch_size Batches by number of rows.", "# TYPE spring_batch_size gauge",
        ]  # fmt: skip
        lines += [f'spring_batch_size{{rows="{k}"}} {v}' for k, v in sorted(sizes.items())]
        durations = list(state.update_seconds)
        lines += [
            "# TYPE spring_queue_depth gauge", f"spring_queue_depth {engine.queue_depth}",
            "# TYPE spring_open_streams gauge", f"spring_open_streams {streams}",
            "# TYPE spring_update_seconds summary", f"spring_update_seconds_sum {sum(durations):.3f}",
            f"spring_update_seconds_count {len(durations)}",
            "# TYPE spring_update_failures_total counter", f"spring_update_failures_total {state.update_failures}",
            "# TYPE spring_pending_interactions gauge",
            f"spring_pending_interactions {pending}",
            "# TYPE spring_uptime_seconds gauge", f"spring_uptime_seconds {uptime:.1f}",
        ]  # fmt: skip
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the app
def create_app(
    engine: ServingEngine, keys: ApiKeys | None, limits: ServeLimits | None = None, model_name: str = "spring"
) -> FastAPI:
    """The FastAPI app over a started [`ServingEngine`].

    Args:
        engine ([`ServingEngine`]): decodes and changes the state.
        keys ([`ApiKeys`], *optional*): who may do what; None: no authentication (local use only).
        limits ([`ServeLimits`], *optional*): size limits.
        model_name (`str`, *optional*, defaults to `"spring"`): the `model` the API reports.
    """
    limits = limits or ServeLimits()
    app = FastAPI(title="transformers-spring", docs_url=None, redoc_url=None)
    metrics = Metrics()
    state = engine.state
    tokenizer = state.tokenizer
    context = getattr(state.spring.base_model.config, "max_position_embeddings", None)
    open_streams = {"n": 0}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error_response(err.status, err.message, err.kind, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        if kind == "json_invalid":
            return _error_response(400, "the body is not valid JSON.", "invalid_request_error", None, "invalid_json")
        if kind == "extra_forbidden":
            return _error_response(400, f"unknown field {param!r}.", "invalid_request_error", param, "unknown_field")
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return _error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error_response(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):  # a bug of ours: say so, without internals
        return _error_response(500, f"internal error ({type(err).__name__}).", "server_error")

    @app.middleware("http")
    async def _limits_and_metrics(request: Request, call_next):
        length = request.headers.get("content-length")
        try:
            too_big = length is not None and int(length) > limits.max_body_bytes
        except ValueError:
            return _error_response(400, "invalid Content-Length header.", "invalid_request_error")
        if too_big:
            response = _error_response(
                413, f"the body is over {limits.max_body_bytes} bytes.", "invalid_request_error", code="body_too_large"
            )
        elif request.method in ("POST", "PUT", "PATCH") and length is None:
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    response = _error_response(413, f"the body is over {limits.max_body_bytes} bytes.",
                                               "invalid_request_error", code="body_too_large")  # fmt: skip
                    break
            else:
                request._body = body  # (starlette reads the cached body)
                response = await call_next(request)
        else:
            response = await call_next(request)
        metrics.count(request.url.path if request.url.path in _PATHS else "other", response.status_code)
        return response

    def authorize(request: Request, user: str | None, *, admin: bool = False) -> None:
        if keys is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        key = keys.get(token) if token else None
        if key is None:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>).", code="invalid_api_key")
        if admin and not key.admin:
            raise ApiError(403, "this needs an admin key.")
        if user is not None and not key.may_act_for(user):
            raise ApiError(403, f"this key may not act for user {user!r}.", "user")

    def valid_user(user: str) -> str:
        try:
            return check_user_id(user)
        except (TypeError, ValueError) as err:
            raise ApiError(400, str(err), "user") from None

    def max_tokens_of(req: _Sampling, extra: int | None = None) -> int:
        value = extra or req.max_tokens or limits.default_max_tokens
        if value > limits.max_tokens:
            raise ApiError(400, f"max_tokens is over the limit of {limits.max_tokens}.", "max_tokens")
        return value

    def job_for(req: _Sampling, input_ids: list[int], max_tokens: int) -> GenerationJob:
        if len(input_ids) > limits.max_prompt_tokens:
            raise ApiError(
                400, f"the prompt has {len(input_ids)} tokens, over the limit of {limits.max_prompt_tokens}.",
                "messages" if isinstance(req, ChatCompletionRequest) else "prompt", "prompt_too_long",
            )  # fmt: skip
        if context is not None and len(input_ids) + max_tokens > context:
            raise ApiError(
                400, f"the prompt ({len(input_ids)} tokens) plus max_tokens ({max_tokens}) is over the model's context "
                f"of {context} tokens.", "max_tokens", "context_length_exceeded",
            )  # fmt: skip
        if engine.queue_depth >= limits.max_queue:
            raise ApiError(429, "the server is busy; retry later.", code="queue_full")
        return GenerationJob(
            input_ids=input_ids, user=req.user, max_tokens=max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed, stop=req.stops(),
        )  # fmt: skip

    async def run(job: GenerationJob, request: Request, kind: str, req: _Sampling):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_event = lambda event, value: loop.call_soon_threadsafe(events.put_nowait, (event, value))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        model = req.model or model_name
        if not req.stream:
            engine.submit(job)
            try:
                while True:
                    try:
                        if (await asyncio.wait_for(events.get(), timeout=1.0))[0] == "done":
                            break
                    except TimeoutError:  # nobody is waiting any more: the row stops at its next step
                        if await request.is_disconnected():
                            job.cancelled.set()
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if job.error is not None:
                raise ApiError(503, f"decoding failed ({type(job.error).__name__}).", code="decoding_failed")
            usage = _usage(job)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": job.text},
                          "finish_reason": job.finish_reason, "logprobs": None}  # fmt: skip
                body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                        "choices": [choice], "usage": usage}  # fmt: skip
            else:
                choice = {"index": 0, "text": job.text, "finish_reason": job.finish_reason, "logprobs": None}
                body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice], "usage": usage}  # fmt: skip
            return JSONResponse(body)
        if open_streams["n"] >= limits.max_concurrent_streams:
            raise ApiError(
                429, f"at most {limits.max_concurrent_streams} concurrent streams.", code="too_many_streams"
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict | str | None, finish: str | None) -> str:
            if kind == "chat":
                choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [choice]}  # fmt: skip
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
                body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice]}  # fmt: skip
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def stream() -> AsyncIterator[str]:
            # The slot and the job start with the stream itself: a client gone before its first byte costs nothing.
            open_streams["n"] += 1
            engine.submit(job)
            try:
                if kind == "chat":
                    yield chunk({"role": "assistant", "content": ""}, None)
                while True:
                    event, value = await events.get()
                    if event == "done":
                        break
                    yield chunk({"content": value} if kind == "chat" else value, None)
                if job.error is not None:
                    error = {"message": f"decoding failed ({type(job.error).__name__}).", "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                else:
                    yield chunk({} if kind == "chat" else "", job.finish_reason)
                    if include_usage:
                        body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                "created": created, "model": model, "choices": [], "usage": _usage(job)}  # fmt: skip
                        yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the stream ended): the row stops decoding at its next step
                job.cancelled.set()
                open_streams["n"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        authorize(request, req.user)
        max_tokens = max_tokens_of(req, req.max_completion_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # a template that refuses this conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {err}", "messages") from None
        if isinstance(input_ids, dict) or hasattr(input_ids, "keys"):
            input_ids = input_ids["input_ids"]
        return await run(job_for(req, list(input_ids), max_tokens), request, "chat", req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        authorize(request, req.user)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "exactly one prompt per request.", "prompt")
        input_ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        if not input_ids:
            raise ApiError(400, "the prompt is empty.", "prompt")
        return await run(job_for(req, list(input_ids), max_tokens_of(req)), request, "completion", req)

    @app.post("/v1/interactions")
    async def interactions(req: InteractionRequest, request: Request):
        authorize(request, req.user)
        try:
            item = Interaction(
                req.user, req.prompt, req.response, timestamp=req.timestamp, metadata=req.metadata or {},
                id=req.id or f"srv-{uuid.uuid4().hex}",
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ApiError(400, str(err), _field_of(str(err))) from None
        duplicate = ApiError(409, f"interaction id {item.id!r} is already recorded.", "id", "duplicate_id")
        if req.id is not None and state.memory is not None:  # (the memory is read on the engine thread)
            if await asyncio.wrap_future(engine.call(lambda: state.memory.get(item.user_id, item.id))) is not None:
                raise duplicate
        # Durable before it is acknowledged: journaled and fsynced (in a thread: fsync blocks). The journal refuses
        # an id it holds, under its lock, so two concurrent posts of one id cannot both be recorded.
        try:
            (seq,) = await asyncio.to_thread(state.journal.append, [item])
        except KeyError:
            raise duplicate from None
        engine.call(lambda: _record_and_update(engine, [item])).add_done_callback(_log_failure)
        return {"id": item.id, "seq": seq, "user": item.user_id, "object": "interaction"}

    @app.get("/v1/users/{user}")
    async def get_user(user: str, request: Request):
        user = valid_user(user)
        authorize(request, user)
        summary = await asyncio.wrap_future(engine.call(lambda: state.user_summary(user)))
        return {"object": "user", **summary}

    @app.delete("/v1/users/{user}")
    async def delete_user(user: str, request: Request):
        user = valid_user(user)
        authorize(request, user)
        known = await asyncio.wrap_future(engine.call(lambda: state.forget_user(user)))
        return {"object": "user.deleted", "user": user, "deleted": bool(known)}

    @app.post("/v1/users/{user}/update")
    async def update_user(user: str, request: Request):
        user = valid_user(user)
        authorize(request, user)
        result = await asyncio.wrap_future(engine.call(lambda: state.update(user)))
        return {"object": "user.update", "user": user, "update": result}

    @app.get("/health")
    async def health():
        return {"status": "ok", "users": len(state.personalizer.users) if state.personalizer else None,
                "queue_depth": engine.queue_depth}  # fmt: skip

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request, None, admin=True)
        return PlainTextResponse(metrics.render(engine, open_streams["n"]), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request, None)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "transformers-spring"}]}

    return app


_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/interactions", "/health", "/metrics", "/v1/models"}


def _snapshot(mapping: dict) -> dict:
    """A copy of a dict another thread may be changing (retried when a change lands mid-copy)."""
    for _ in range(10):
        try:
            return {k: list(v) if isinstance(v, list) else v for k, v in list(mapping.items())}
        except RuntimeError:
            continue
    return {}


def _usage(job: GenerationJob) -> dict[str, int]:
    prompt = len(job.input_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(job.token_ids),
        "total_tokens": prompt + len(job.token_ids),
    }


def _field_of(message: str) -> str | None:
    for name in ("user_id", "prompt", "response", "timestamp", "metadata", "id"):
        if f"`{name}`" in message or f"'{name}'" in message:
            return "user" if name == "user_id" else name
    return None


def _log_failure(future) -> None:
    if future.exception() is not None:  # journaled already: a restart replays it into the memory
        logger.error(f"recording an interaction failed: {future.exception()!r}")


def _record_and_update(engine: ServingEngine, items: list[Interaction]) -> None:
    """On the engine thread: the items into the memory, then the period update of every user they made due."""
    for user in engine.state.record(items):
        engine.state.update(user)
