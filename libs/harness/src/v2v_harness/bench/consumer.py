"""The event consumer alone: CPU and time per event of one `EventConsumer` hop, with nothing else running.

`python -m v2v_harness.bench.consumer` starts an embedded Postgres and Tansu, migrates one service
schema (inbox, outbox) and runs one consumer whose handler does what a platform hop does: one state
insert and one outbox event, in the consumer's transaction, with tracing on (spans to a JSON-lines file,
asyncpg instrumented, as in the services). Two measurements:

- backlog: `--events` events are produced first, then the consumer drains them: events/s, and CPU ms per
  event of this process (the consumer, its span export thread) and of Postgres;
- paced: events produced at `--rate` per second for `--seconds` while the consumer runs: produce →
  handled latency (from the CloudEvent's own time) and CPU per event (this process includes the
  producer here; Postgres separately).

The figures isolate the consumer from the rest of the platform (no HTTP, no other service), so that a
change to `v2v_messaging` can be compared on a shared machine by CPU time rather than by latency. To
measure another version of the consumer, put its `libs/messaging/src` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from aiokafka import AIOKafkaProducer

from v2v_contracts import CloudEvent, EventData
from v2v_harness.bench.procs import POSTGRES, ProcessGroups
from v2v_harness.bench.stats import summarise
from v2v_harness.infra import start_infrastructure
from v2v_harness.provision import provision
from v2v_messaging import (
    MIGRATIONS_DIR,
    EventConsumer,
    EventMeta,
    HandlerRegistry,
    KafkaSettings,
    Tx,
    UnitOfWork,
    ensure_topics,
    make_broker,
    notify_channel,
)
from v2v_observability import configure_tracing
from v2v_persistence import apply_migrations, create_pool

SERVICE, SCHEMA = "order", "ordering"  # any service's schema: the messaging tables are the same


class BenchHopV1(EventData):
    """The benchmark's own event (routed by the registry like any contract)."""

    TYPE = "scheduling.bench_hop.v1"
    SERVICE = "scheduling"
    n: int


def _event(n: int) -> CloudEvent:
    return CloudEvent(
        source="/v2v/scheduling", type=BenchHopV1.TYPE, subject=f"order-{n % 97}", data={"n": n}
    )


def _traceparent() -> bytes:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode()


async def _produce(producer: AIOKafkaProducer, topic: str, n: int) -> None:
    event = _event(n)
    await producer.send(
        topic, event.to_json(), key=event.subject.encode(), headers=[("traceparent", _traceparent())]
    )


def _pg_cpu(groups: ProcessGroups, before: Any, after: Any) -> float:
    return float(groups.delta(before, after).get(POSTGRES) or 0.0)


async def run(events: int, rate: float, seconds: float, batch_max: int | None) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="v2v-consumer-bench-"))
    infra = start_infrastructure(state, durable=False)
    try:
        urls = await provision(infra.admin_url, f"cb_{uuid.uuid4().hex[:8]}")
        url, owner_url = urls[SERVICE], urls.owner_urls[SERVICE]
        await apply_migrations(owner_url, SCHEMA, [MIGRATIONS_DIR])
        owner = await asyncpg.connect(owner_url)
        await owner.execute(
            "CREATE TABLE bench_state (id bigserial PRIMARY KEY, event_id uuid NOT NULL, n int NOT NULL)"
        )
        await owner.close()
        provider = configure_tracing("bench-consumer", str(state))
        from v2v_observability import TelemetrySettings, instrument_asyncpg

        instrument_asyncpg(provider, TelemetrySettings.from_env().statement_min_ms)  # as the services do
        pool = await create_pool(url, max_size=6)
        kafka = KafkaSettings(
            bootstrap_servers=infra.bootstrap_servers,
            enable_idempotence=infra.kafka_idempotence,
            fetch_max_wait_ms=infra.kafka_fetch_max_wait_ms,
        )
        ns = f"cb{uuid.uuid4().hex[:6]}"
        topic, out_topic, dlq = f"{ns}.v2v.scheduling", f"{ns}.v2v.order", f"{ns}.v2v.order.dlq"
        await ensure_topics(kafka, [topic, out_topic, dlq])
        uow: UnitOfWork[Tx] = UnitOfWork(pool, out_topic, notify_channel(SCHEMA))
        lags: list[float] = []
        handled = 0
        target = 1  # `reached` is set once `handled` gets there
        reached = asyncio.Event()

        async def until(count: int, timeout: float | None = None) -> None:
            nonlocal target
            target = count
            reached.clear()
            if handled < count:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reached.wait(), timeout)

        registry = HandlerRegistry[Tx]()

        async def hop(tx: Tx, data: BenchHopV1, meta: EventMeta) -> None:
            nonlocal handled
            assert tx.conn is not None
            await tx.conn.execute("INSERT INTO bench_state (event_id, n) VALUES ($1, $2)", meta.id, data.n)
            await tx.outbox.add(
                CloudEvent(source="/v2v/order", type="order.bench_hop.v1", subject=meta.subject, data={})
            )
            lags.append((time.time() - meta.time.timestamp()) * 1000)
            handled += 1
            if handled >= target:
                reached.set()

        registry.add(BenchHopV1, hop)
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=False, linger_ms=2
        )
        await producer.start()
        for n in range(events):
            await _produce(producer, topic, n)
        await producer.flush()

        broker = make_broker(kafka, "bench-consumer", provider)
        options: dict[str, Any] = {}
        if batch_max is not None and "batch_max" in inspect.signature(EventConsumer).parameters:
            options["batch_max"] = batch_max
        EventConsumer(
            service="order",
            purpose="bench",
            topics=[topic],
            handlers=registry,
            uow=uow,
            broker=broker,
            dead_letter_topic=dlq,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            session_timeout_ms=1000,
            heartbeat_interval_ms=250,
            **options,
        )
        groups = ProcessGroups({})
        me = psutil.Process(os.getpid())
        await broker.start()
        await until(1)
        t0, cpu0, snap0, first = time.perf_counter(), me.cpu_times(), groups.snapshot(), handled
        await until(events)
        t1, cpu1, snap1 = time.perf_counter(), me.cpu_times(), groups.snapshot()
        n_backlog = events - first
        backlog = {
            "events": n_backlog,
            "events_per_s": n_backlog / (t1 - t0),
            "cpu_ms_per_event": 1000 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / n_backlog,
            "postgres_cpu_ms_per_event": 1000 * _pg_cpu(groups, snap0, snap1) / n_backlog,
        }

        lags.clear()
        start_handled = handled
        total = int(rate * seconds)
        cpu0, snap0 = me.cpu_times(), groups.snapshot()
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for n in range(total):
            delay = begin + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await _produce(producer, topic, events + n)
        await until(start_handled + total, timeout=30)
        cpu1, snap1 = me.cpu_times(), groups.snapshot()
        done = handled - start_handled
        paced = {
            "rate": rate,
            "events": total,
            "handled": done,
            "lag_ms": summarise(list(lags)),
            "cpu_ms_per_event": 1000 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / max(1, done),
            "postgres_cpu_ms_per_event": 1000 * _pg_cpu(groups, snap0, snap1) / max(1, done),
        }
        await producer.stop()
        await broker.stop()
        await pool.close()
        return {"backlog": backlog, "paced": paced, "load_average": os.getloadavg()}
    finally:
        infra.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--events", type=int, default=3000, help="backlog to drain")
    parser.add_argument("--rate", type=float, default=200.0, help="paced events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced duration")
    parser.add_argument("--batch-max", type=int, default=None, help="records per poll (batching consumers)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the services do)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(run(args.events, args.rate, args.seconds, args.batch_max))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
