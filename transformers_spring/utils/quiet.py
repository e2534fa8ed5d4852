"""Third-party log lines that carry no action for the user, dropped at the logger that emits them.

Each filter matches one message of one named logger; every other record of that logger, and every other logger, is
left alone. The list, where each line comes from and why it carries no action is in `docs/memory.md` ("What we
silence, and why"). Setting `SPRING_SHOW_THIRD_PARTY_LOGS=1` shows them again (read at each record, so it works in a
running process too).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

SHOW_ENV = "SPRING_SHOW_THIRD_PARTY_LOGS"

_LOCK = threading.Lock()


def third_party_logs_shown() -> bool:
    """Whether `$SPRING_SHOW_THIRD_PARTY_LOGS` asks for the filtered third-party lines (`1`, `true`, `yes`, `on`)."""
    return os.environ.get(SHOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class DropMessage(logging.Filter):
    """A filter for one third-party logger that drops the records `match` accepts (all pass while
    `$SPRING_SHOW_THIRD_PARTY_LOGS` is set).

    Args:
        match (`Callable[[logging.LogRecord], bool]`): whether a record is the silenced message.
    """

    def __init__(self, match: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        return third_party_logs_shown() or not self.match(record)


def _last_frame_name(error: BaseException) -> str | None:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name if tb is not None else None


def is_lite_mvcc_fallback(record: logging.LogRecord) -> bool:
    """pymilvus's query iterator asks the server for a session (MVCC) timestamp; Milvus Lite sends none, so pymilvus
    warns and uses the client's clock, which is the server's own clock for an in-process server."""
    return record.levelno == logging.WARNING and str(record.msg).startswith("failed to get mvccTs from milvus server")


def is_lite_alloc_timestamp_unimplemented(record: logging.LogRecord) -> bool:
    """pymilvus calls `AllocTimestamp` while it waits for a new index; Milvus Lite's in-process gRPC server does not
    implement it, grpc logs the servicer's `NotImplementedError` with its traceback, and pymilvus ignores the
    UNIMPLEMENTED answer by design (`ignore_unimplemented`)."""
    error = record.exc_info[1] if record.exc_info else None
    return (
        isinstance(error, NotImplementedError)
        and record.msg == "Exception calling application: Method not implemented!"
        and _last_frame_name(error) == "AllocTimestamp"
    )


# (logger name, message): the logger is the one that creates the record (a filter on a parent logger never sees
# the records of its children).
MILVUS_LITE_FILTERS: tuple[tuple[str, Callable[[logging.LogRecord], bool]], ...] = (
    ("pymilvus.client.iterator.query_iterator", is_lite_mvcc_fallback),
    ("grpc._server", is_lite_alloc_timestamp_unimplemented),
)


def install_filters(filters: tuple[tuple[str, Callable[[logging.LogRecord], bool]], ...]) -> None:
    """Adds a [`DropMessage`] for each `(logger name, match)` of `filters`, once per logger and match (idempotent,
    thread-safe)."""
    with _LOCK:
        for name, match in filters:
            target = logging.getLogger(name)
            if not any(isinstance(f, DropMessage) and f.match is match for f in target.filters):
                target.addFilter(DropMessage(match))


def quiet_milvus_lite() -> None:
    """Installs the Milvus Lite filters ([`MILVUS_LITE_FILTERS`]); called when a Milvus Lite backend is created."""
    install_filters(MILVUS_LITE_FILTERS)
