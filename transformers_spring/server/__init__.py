"""`spring serve`: personalized generation over an OpenAI-compatible HTTP API (needs the `serve` extra:
`pip install transformers-spring[serve]`). See `docs/serving.md`."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from .auth import ApiKey, ApiKeys
from .engine import GenerationJob, RowController, RowSampler, ServingEngine
from .state import ServerState, limit_malloc_arenas

logger = logging.get_logger(__name__)


@dataclass
class ServeArguments:
    """The settings of `spring serve`."""

    state: str = field(metadata={"help": "A ContinualPersonalizer folder (served and updated) or a SpringForCausalLM "
                                         "folder (served only)."})  # fmt: skip
    workdir: str = field(default="spring-serve", metadata={"help": "The server's work directory: its copy of the "
                         "state, the interaction journal and its bookkeeping."})  # fmt: skip
    host: str = field(default="127.0.0.1", metadata={"help": "The address to listen on."})
    port: int = field(default=8000, metadata={"help": "The port to listen on (0: a free one)."})
    api_keys: str | None = field(default=None, metadata={"help": "A JSON file of API keys (see docs/serving.md); "
                                 "else the SPRING_SERVE_API_KEYS environment variable."})  # fmt: skip
    no_auth: bool = field(default=False, metadata={"help": "Serve without API keys (local use only)."})
    base_model: str | None = field(default=None, metadata={"help": "The base model, when not the one the folder "
                                   "names."})  # fmt: skip
    period_size: int = field(default=8, metadata={"help": "A user's recorded interactions that trigger their SPRInG "
                             "period update (0: only POST /v1/users/{user}/update)."})  # fmt: skip
    max_batch_size: int = field(default=8, metadata={"help": "The most requests decoded together."})
    batch_wait_ms: float = field(default=10.0, metadata={"help": "How long the first request of a batch waits for "
                                 "others (milliseconds)."})  # fmt: skip
    max_resident_adapters: int = field(default=64, metadata={"help": "User adapters kept loaded."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "The largest request body."})
    max_prompt_tokens: int = field(default=4096, metadata={"help": "The longest prompt, in tokens."})
    max_tokens: int = field(default=512, metadata={"help": "The largest `max_tokens` a request may ask for."})
    default_max_tokens: int = field(default=128, metadata={"help": "`max_tokens` when a request gives none."})
    max_concurrent_streams: int = field(default=64, metadata={"help": "The most open streaming responses."})
    max_queue: int = field(default=256, metadata={"help": "The most queued requests (then 429)."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    model_name: str = field(default="spring", metadata={"help": "The model id the API reports."})


def build_app(args: ServeArguments):
    """The state, the started engine and the FastAPI app of `args`: `(app, engine)`."""
    import torch

    from .app import ServeLimits, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.max_batch_size <= args.max_resident_adapters:
        raise ValueError(
            f"`max_batch_size` ({args.max_batch_size}) must be between 1 and `max_resident_adapters` "
            f"({args.max_resident_adapters}): every user of a batch needs their adapter loaded."
        )
    keys = ApiKeys.load(args.api_keys)
    if keys is None and not args.no_auth:
        raise ValueError(
            "no API keys: pass `--api_keys FILE`, set SPRING_SERVE_API_KEYS, or pass `--no_auth` for local use."
        )
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            f"serving on {args.host} without API keys (--no_auth): anyone who reaches it acts for every user."
        )
    limit_malloc_arenas()
    state = ServerState(
        args.state, args.workdir, period_size=args.period_size, base_model=args.base_model,
        max_resident_adapters=args.max_resident_adapters,
    )  # fmt: skip
    engine = ServingEngine(state, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000)
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens, max_concurrent_streams=args.max_concurrent_streams,
        max_queue=args.max_queue,
    )  # fmt: skip
    app = create_app(engine.start(), None if args.no_auth else keys, limits, model_name=args.model_name)
    return app, engine


class BackgroundServer:
    """Runs the app with uvicorn in a thread (tests, notebooks): `with BackgroundServer(args) as server:` then
    `server.base_url`.

    Args:
        args ([`ServeArguments`]): the settings (`port=0` picks a free port).
    """

    def __init__(self, args: ServeArguments):
        self.args = args
        self.app, self.engine = build_app(args)
        self.port = args.port or _free_port(args.host)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.args.host}:{self.port}/v1"

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        config = uvicorn.Config(self.app, host=self.args.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="spring-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.engine.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(args: ServeArguments) -> None:
    """Serves until interrupted (uvicorn in the foreground)."""
    import uvicorn

    app, engine = build_app(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port or _free_port(args.host), log_level="info", lifespan="off")
    finally:
        engine.stop()


__all__ = [
    "ApiKey",
    "ApiKeys",
    "BackgroundServer",
    "GenerationJob",
    "RowController",
    "RowSampler",
    "ServeArguments",
    "ServerState",
    "ServingEngine",
    "build_app",
    "serve",
]
