"""A consumer process for the broker fault tests: an `EventConsumer` of the probe events, on its own.

    python tests/integration/probe_consumer.py BOOTSTRAP DATABASE_URL TOPIC DLQ SERVICE DELAY_S SLOW_FROM

Handling a probe event takes DELAY_S from the event numbered SLOW_FROM on. Each one appends a row to
`it_applied` (no unique key: a second application of the
same event would show as a second row), in the inbox's transaction. The test pauses it (SIGSTOP) and
resumes it (SIGCONT) like the chaos nemesis does, and reads what it did from Postgres.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from v2v_contracts import EventData
from v2v_messaging import (
    EventConsumer,
    EventMeta,
    HandlerRegistry,
    KafkaSettings,
    Tx,
    UnitOfWork,
    make_broker,
    notify_channel,
)
from v2v_messaging.consumer import BATCH_MAX
from v2v_persistence import create_pool


class OrderProbeV1(EventData):
    TYPE = "order.fault_probe.v1"
    SERVICE = "order"
    n: int


async def main(
    bootstrap: str,
    url: str,
    topic: str,
    dlq: str,
    service: str,
    delay_s: float,
    slow_from: int,
    batch_max: int = BATCH_MAX,
) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, enable_idempotence=False, fetch_max_wait_ms=20)
    pool = await create_pool(url, max_size=4)
    uow: UnitOfWork[Any] = UnitOfWork(pool, topic, notify_channel("ordering"))
    registry = HandlerRegistry[Tx]()

    @registry.on(OrderProbeV1)
    async def handle(tx: Tx, data: OrderProbeV1, meta: EventMeta) -> None:
        for _ in range(10 if data.n >= slow_from else 0):  # in steps: paused and resumed, it goes on
            await asyncio.sleep(delay_s / 10)
        await tx.conn.execute("INSERT INTO it_applied (event_id, n) VALUES ($1, $2)", meta.id, data.n)

    broker = make_broker(kafka, f"it-{service}", tracer_provider=None)
    EventConsumer(  # registers its subscriber on the broker
        service=service,
        purpose="probe",
        topics=[topic],
        handlers=registry,
        uow=uow,
        broker=broker,
        dead_letter_topic=dlq,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
        batch_max=batch_max,
    )
    # the services' group settings: a heartbeat every 3 s, a 10 s session (Tansu holds a join for 5 s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await broker.start()
    print("consumer started", flush=True)
    try:
        await stop.wait()
    finally:
        await broker.stop()
        await pool.close()


if __name__ == "__main__":
    bootstrap, url, topic, dlq, service, delay, slow_from = sys.argv[1:8]
    # an optional 9th argument: the records one poll applies in one transaction (default: the services')
    batch = int(sys.argv[8]) if len(sys.argv) > 8 else BATCH_MAX
    asyncio.run(main(bootstrap, url, topic, dlq, service, float(delay), int(slow_from), batch))
