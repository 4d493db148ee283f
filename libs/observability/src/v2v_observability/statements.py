"""Spans for the SQL statements worth an SRE's look: the slow ones and the failed ones.

OpenTelemetry's asyncpg instrumentation makes a span for every statement: it builds the span's
attributes, asks the sampler, starts the span and makes it current before the statement is sent, for
each of the ~100 statements an order costs the platform. Measured on this machine (uvloop, one
connection, a one-row SELECT by key): 52 µs of client CPU per statement without it, 131 µs with it,
before the span is exported at all. The statements of an order's happy path each take well under a
millisecond; their spans said "a statement ran", which the span of the request or of the consumed event
around them already says.

Here the clock is read before and after each statement, which is all a fast statement costs; a span is
made afterwards, with the statement's own start and end times, only when the statement
- took at least `V2V_TRACE_STATEMENT_MIN_MS` milliseconds (50 by default; 0 records every statement, as
  the OpenTelemetry instrumentation did), or
- failed (the error's type on the span, status ERROR), whatever its duration.
The duration is the caller's: it includes the wait for the event loop to resume the caller once the
answer is in. On a service near saturation every statement waits milliseconds that way; 50 ms keeps the
spans for statements that are slow in any sense, and keeps a busy service from spending more on spans
the busier it gets (10 ms did: 4.6 % of the order service's samples made statement spans under load).
The span looks as the OpenTelemetry instrumentation's did: named after the statement's first word, kind
CLIENT, `db.system`, `db.name`, `db.user`, `net.peer.name`/`net.peer.port`, `db.statement`; it is a
child of the span current when the statement was sent, so it carries the order bound there
(`OrderAttributesProcessor`) and falls in that order's trace.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

DEFAULT_MIN_MS = 50.0
_METHODS = ("execute", "executemany", "fetch", "fetchval", "fetchrow")
_LEADING_COMMENT = re.compile(r"^\s*/\*.*?\*/", re.S)
_ORIGINAL = "__v2v_untraced__"

_installed: dict[str, Any] = {}


def statement_name(query: object) -> str:
    """The span's name: the statement's first word, after any leading comment (`SELECT`, `COMMIT;`)."""
    if not isinstance(query, str):
        return "postgresql"
    words = _LEADING_COMMENT.sub("", query, count=1).split(maxsplit=1)
    return words[0] if words else "postgresql"


def statement_attributes(conn: object, query: object) -> dict[str, Any]:
    attributes: dict[str, Any] = {"db.system": "postgresql"}
    params = getattr(conn, "_params", None)
    if (database := getattr(params, "database", None)) is not None:
        attributes["db.name"] = database
    if (user := getattr(params, "user", None)) is not None:
        attributes["db.user"] = user
    addr = getattr(conn, "_addr", None)
    if isinstance(addr, tuple) and len(addr) >= 2:
        attributes["net.peer.name"] = addr[0]
        attributes["net.peer.port"] = addr[1]
        attributes["net.transport"] = "ip_tcp"
    elif isinstance(addr, str):
        attributes["net.peer.name"] = addr
    if isinstance(query, str):
        attributes["db.statement"] = query
    return attributes


def record_statement(
    tracer: Tracer,
    conn: object,
    query: object,
    start_ns: int,
    end_ns: int,
    error: BaseException | None = None,
) -> None:
    """A finished statement's span, from `start_ns` to `end_ns` (epoch nanoseconds); none inside
    `suppress_instrumentation()` (the outbox relay's bookkeeping, the consumers' inbox rows)."""
    if not is_instrumentation_enabled():
        return
    span = tracer.start_span(
        statement_name(query),
        kind=SpanKind.CLIENT,
        attributes=statement_attributes(conn, query),
        start_time=start_ns,
    )
    if error is not None and span.is_recording():
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", type(error).__qualname__)
    span.end(end_time=end_ns)


Method = Callable[..., Awaitable[Any]]


def traced_method(method: Method, tracer: Tracer, min_ms: float) -> Method:
    """`method` (an asyncpg `Connection` method whose first argument is the query) timed, and recorded
    as a span when it is slow or fails."""
    min_ns = int(min_ms * 1_000_000)
    clock = time.time_ns

    @functools.wraps(method)
    async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        query = args[0] if args else kwargs.get("query", kwargs.get("command"))
        start = clock()
        try:
            result = await method(self, *args, **kwargs)
        except Exception as exc:
            record_statement(tracer, self, query, start, clock(), exc)
            raise
        end = clock()
        if end - start >= min_ns:
            record_statement(tracer, self, query, start, end)
        return result

    setattr(timed, _ORIGINAL, method)
    return timed


def instrument_asyncpg(
    tracer_provider: trace.TracerProvider | None = None, min_ms: float = DEFAULT_MIN_MS
) -> None:
    """Time asyncpg's `Connection` statement methods in this process (once; a second call only changes
    the threshold). Pooled connections go through the same methods."""
    import asyncpg

    tracer = trace.get_tracer("v2v_observability.statements", tracer_provider=tracer_provider)
    for name in _METHODS:
        current = getattr(asyncpg.Connection, name)
        original = getattr(current, _ORIGINAL, current)
        setattr(asyncpg.Connection, name, traced_method(original, tracer, min_ms))
        _installed[name] = original


def uninstrument_asyncpg() -> None:
    import asyncpg

    for name, original in list(_installed.items()):
        setattr(asyncpg.Connection, name, original)
        del _installed[name]
