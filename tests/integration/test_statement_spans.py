"""Statement spans on a real Postgres: a slow statement and a failed one get a span, a fast one none,
each in the trace of the span that sent it and carrying its order (v2v_observability.statements)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from v2v_harness import pytest_plugin
from v2v_observability import bind_order
from v2v_observability.statements import instrument_asyncpg, uninstrument_asyncpg
from v2v_observability.tracing import OrderAttributesProcessor, SkipTrivialStatements

pytestmark = pytest.mark.integration


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=SkipTrivialStatements(ALWAYS_ON))
    provider.add_span_processor(OrderAttributesProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    uninstrument_asyncpg()


async def test_only_slow_and_failed_statements_get_spans_in_the_callers_trace(
    test_db: pytest_plugin.TestDatabase, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    instrument_asyncpg(provider, min_ms=50)
    tracer = provider.get_tracer("test")
    order_id = uuid.uuid4()
    pool = await asyncpg.create_pool(test_db.admin_url, min_size=1, max_size=1)
    try:
        with tracer.start_as_current_span("request") as request:
            bind_order(order_id, "W1234-26-000001")
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 41 + 1") == 42  # fast: no span
                async with conn.transaction():  # BEGIN (trivial) and COMMIT, both fast: no span
                    await conn.execute("SELECT pg_sleep(0.08)")  # slow: a span
                with pytest.raises(asyncpg.UndefinedTableError):
                    await conn.fetch("SELECT * FROM no_such_table WHERE id = $1", 1)  # failed: a span
            assert await pool.fetchrow("SELECT 1 AS one") is not None  # through the pool: fast
    finally:
        await pool.close()

    statements = [s for s in exporter.get_finished_spans() if s.name != "request"]
    assert [(s.name, s.attributes["db.statement"]) for s in statements] == [  # type: ignore[index]
        ("SELECT", "SELECT pg_sleep(0.08)"),
        ("SELECT", "SELECT * FROM no_such_table WHERE id = $1"),
    ]
    slow, failed = statements
    for span in statements:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id
        assert span.context.trace_id == request.get_span_context().trace_id
        assert span.attributes["db.system"] == "postgresql"  # type: ignore[index]
        assert span.attributes["v2v.order_id"] == str(order_id)  # type: ignore[index]
    assert slow.end_time - slow.start_time >= 80_000_000  # type: ignore[operator]  # its own times
    assert slow.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "UndefinedTableError"  # type: ignore[index]


async def test_a_threshold_of_zero_records_every_statement_but_the_trivial_ones(
    test_db: pytest_plugin.TestDatabase, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    instrument_asyncpg(provider, min_ms=0)
    conn = await asyncpg.connect(test_db.admin_url)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE t (v int)")
            await conn.executemany("INSERT INTO t VALUES ($1)", [(1,), (2,)])
            assert await conn.fetchval("SELECT count(*) FROM t") == 2
    finally:
        await conn.close()
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["CREATE", "INSERT", "SELECT", "COMMIT;"]  # BEGIN is trivial: never a span


async def test_no_span_inside_suppress_instrumentation_however_slow(
    test_db: pytest_plugin.TestDatabase, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The outbox relay's bookkeeping and the consumers' inbox rows run suppressed: no span of theirs."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    provider, exporter = spans
    instrument_asyncpg(provider, min_ms=0)
    conn = await asyncpg.connect(test_db.admin_url)
    try:
        with suppress_instrumentation():
            await conn.execute("SELECT pg_sleep(0.02)")
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table")
        await conn.execute("SELECT 1")
    finally:
        await conn.close()
    assert [s.attributes["db.statement"] for s in exporter.get_finished_spans()] == ["SELECT 1"]  # type: ignore[index]
