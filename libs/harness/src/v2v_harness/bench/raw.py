"""The raw limits of the same Postgres and broker the platform runs on, with no framework in the way.

- asyncpg: transactions of two inserts per second, one connection in a loop and 16 concurrently;
- aiokafka: produce rate batched (acks=all, futures awaited in bulk) and awaited one by one, and the
  consume rate of what was produced;
- a raw 5-hop chain: the generator produces to topic 1; hop k consumes topic k and, per message, writes
  one transaction (inbox insert + state insert + outbox insert), then produces to topic k+1 with
  acks=all (awaited per fetched batch) and commits its offsets; the chain ends when hop 5's produce is
  acknowledged. Its maximum sustained rate is found with the same open-model ramp as the platform's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from v2v_harness.bench.config import BenchConfig
from v2v_harness.bench.loadgen import open_loop
from v2v_harness.bench.stats import find_knee, fmt_rate, send_schedule, step_passes, summarise

HOPS = 5
PARTITIONS = 6
PAYLOAD_PAD = "x" * 400  # about the size of a CloudEvent of the platform

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS bench_raw;
CREATE TABLE IF NOT EXISTS bench_raw.tx_a (
    id bigserial PRIMARY KEY, ref uuid NOT NULL, payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_raw.tx_b (
    id bigserial PRIMARY KEY, ref uuid NOT NULL, payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_raw.inbox (
    consumer text NOT NULL, event_id uuid NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id));
CREATE TABLE IF NOT EXISTS bench_raw.state (
    order_id uuid NOT NULL, hop int NOT NULL, status text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (order_id, hop));
CREATE TABLE IF NOT EXISTS bench_raw.outbox (
    id bigserial PRIMARY KEY, event_id uuid NOT NULL, topic text NOT NULL, key text NOT NULL,
    payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz);
"""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KafkaTarget:
    bootstrap_servers: str
    idempotence: bool
    fetch_max_wait_ms: int
    session_timeout_ms: int


async def create_topics(bootstrap: str, topics: list[str], partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for topic in topics:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def _producer(kafka: KafkaTarget, **extra: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks="all",
        enable_idempotence=kafka.idempotence,
        **extra,
    )


# ---- Postgres -----------------------------------------------------------------------------------------


async def pg_transactions_per_s(dsn: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """Transactions of two inserts per second over `seconds`, from `concurrency` connections at once."""
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    assert pool is not None
    count = 0
    payload = PAYLOAD_PAD[:200]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds

        async def worker() -> None:
            nonlocal count
            async with pool.acquire() as conn:
                while loop.time() < deadline:
                    ref = uuid.uuid4()
                    async with conn.transaction():
                        await conn.execute(
                            "INSERT INTO bench_raw.tx_a (ref, payload) VALUES ($1, $2)", ref, payload
                        )
                        await conn.execute(
                            "INSERT INTO bench_raw.tx_b (ref, payload) VALUES ($1, $2)", ref, payload
                        )
                    count += 1

        start = loop.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - start
    finally:
        await pool.close()
    return {"transactions": count, "seconds": elapsed, "per_s": count / elapsed if elapsed else 0.0}


# ---- Kafka ------------------------------------------------------------------------------------------


def _message(i: int) -> tuple[bytes, bytes]:
    key = str(uuid.uuid4()).encode()
    value = json.dumps({"i": i, "pad": PAYLOAD_PAD}).encode()
    return key, value


async def kafka_produce_batched(kafka: KafkaTarget, topic: str, seconds: float) -> dict[str, Any]:
    """Messages per second with acks=all when sends are not awaited one by one (futures in bulk)."""
    producer = _producer(kafka, linger_ms=5)
    await producer.start()
    count = 0
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + seconds
        pending: list[asyncio.Future[Any]] = []
        while loop.time() < deadline:
            key, value = _message(count)
            pending.append(await producer.send(topic, value, key=key))
            count += 1
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        elapsed = loop.time() - start
    finally:
        await producer.stop()
    return {"messages": count, "seconds": elapsed, "per_s": count / elapsed if elapsed else 0.0}


async def kafka_produce_awaited(kafka: KafkaTarget, topic: str, seconds: float) -> dict[str, Any]:
    """Messages per second with acks=all when each send waits for its acknowledgement."""
    producer = _producer(kafka)
    await producer.start()
    count = 0
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + seconds
        while loop.time() < deadline:
            key, value = _message(count)
            await producer.send_and_wait(topic, value, key=key)
            count += 1
        elapsed = loop.time() - start
    finally:
        await producer.stop()
    return {"messages": count, "seconds": elapsed, "per_s": count / elapsed if elapsed else 0.0}


async def kafka_consume(kafka: KafkaTarget, topic: str, expected: int, timeout: float) -> dict[str, Any]:
    """Messages per second reading `topic` from the beginning until `expected` messages have arrived."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        enable_auto_commit=False,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 2**20,
    )
    await consumer.start()
    count = 0
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout
        while count < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            count += sum(len(msgs) for msgs in batches.values())
        elapsed = loop.time() - start
    finally:
        await consumer.stop()
    return {"messages": count, "seconds": elapsed, "per_s": count / elapsed if elapsed else 0.0}


# ---- the raw 5-hop chain ----------------------------------------------------------------------------


class RawChain:
    """Five hops in this process, each with its own consumer group and Postgres connection, sharing one
    producer (acks=all)."""

    def __init__(self, dsn: str, kafka: KafkaTarget, namespace: str) -> None:
        self.dsn = dsn
        self.kafka = kafka
        self.topics = [f"{namespace}.raw.hop{k}" for k in range(1, HOPS + 2)]  # hop k reads topics[k-1]
        self.namespace = namespace
        self.sent: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.errors = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[AIOKafkaConsumer] = []
        self._conns: list[asyncpg.Connection] = []
        self.producer: AIOKafkaProducer | None = None
        self._stopping = False

    async def start(self) -> None:
        await create_topics(self.kafka.bootstrap_servers, self.topics)
        self.producer = _producer(self.kafka)
        await self.producer.start()
        for k in range(1, HOPS + 1):
            consumer = AIOKafkaConsumer(
                self.topics[k - 1],
                bootstrap_servers=self.kafka.bootstrap_servers,
                group_id=f"{self.namespace}.raw.hop{k}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.kafka.fetch_max_wait_ms,
                session_timeout_ms=self.kafka.session_timeout_ms,
                heartbeat_interval_ms=max(250, self.kafka.session_timeout_ms // 4),
            )
            self._consumers.append(consumer)
            self._conns.append(await asyncpg.connect(self.dsn))
        await asyncio.gather(*(c.start() for c in self._consumers))
        for k in range(1, HOPS + 1):
            self._tasks.append(asyncio.create_task(self._hop(k), name=f"raw-hop{k}"))

    async def _hop(self, k: int) -> None:
        consumer, conn, producer = self._consumers[k - 1], self._conns[k - 1], self.producer
        assert producer is not None
        group = f"raw.hop{k}"
        next_topic = self.topics[k]
        while not self._stopping:
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=500)
            except Exception:
                if self._stopping:
                    return
                self.errors += 1
                await asyncio.sleep(0.1)
                continue
            if not batches:
                continue
            acks: list[tuple[str, asyncio.Future[Any]]] = []
            for msgs in batches.values():
                for msg in msgs:
                    event = json.loads(msg.value)
                    order_id = event["order_id"]
                    out = {
                        "id": str(uuid.uuid4()),
                        "order_id": order_id,
                        "hop": k,
                        "pad": PAYLOAD_PAD,
                    }
                    body = json.dumps(out)
                    try:
                        async with conn.transaction():
                            await conn.execute(
                                "INSERT INTO bench_raw.inbox (consumer, event_id) VALUES ($1, $2)"
                                " ON CONFLICT DO NOTHING",
                                group,
                                uuid.UUID(event["id"]),
                            )
                            await conn.execute(
                                "INSERT INTO bench_raw.state (order_id, hop, status) VALUES ($1, $2, $3)"
                                " ON CONFLICT (order_id, hop) DO UPDATE SET status = excluded.status,"
                                " updated_at = now()",
                                uuid.UUID(order_id),
                                k,
                                f"hop{k}",
                            )
                            await conn.execute(
                                "INSERT INTO bench_raw.outbox (event_id, topic, key, payload)"
                                " VALUES ($1, $2, $3, $4::jsonb)",
                                uuid.UUID(out["id"]),
                                next_topic,
                                order_id,
                                body,
                            )
                    except Exception:
                        self.errors += 1
                        continue
                    fut = await producer.send(next_topic, body.encode(), key=order_id.encode())
                    acks.append((order_id, fut))
            results = await asyncio.gather(*(f for _, f in acks), return_exceptions=True)
            now = time.perf_counter()
            for (order_id, _), res in zip(acks, results, strict=True):
                if isinstance(res, BaseException):
                    self.errors += 1
                elif k == HOPS:
                    self.done[order_id] = now
            try:
                await consumer.commit()
            except Exception:
                self.errors += 1

    async def send(self, order_id: str) -> None:
        assert self.producer is not None
        event = {"id": str(uuid.uuid4()), "order_id": order_id, "hop": 0, "pad": PAYLOAD_PAD}
        self.sent[order_id] = time.perf_counter()
        await self.producer.send(self.topics[0], json.dumps(event).encode(), key=order_id.encode())

    async def wait_done(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i in self.done for i in ids):
                return True
            await asyncio.sleep(0.05)
        return all(i in self.done for i in ids)

    async def step(self, rate: float, seconds: float, drain: float, progress: Progress) -> dict[str, Any]:
        offsets = send_schedule(rate, seconds)
        ids = [str(uuid.uuid4()) for _ in offsets]
        errors_before = self.errors

        async def fire(i: int) -> None:
            await self.send(ids[i])

        loop = await open_loop(offsets, fire, max_inflight=10_000)
        sent = [i for i in ids if i in self.sent]
        complete = await self.wait_done(sent, drain)
        latencies = [(self.done[i] - self.sent[i]) * 1000.0 for i in sent if i in self.done]
        step: dict[str, Any] = {
            "rate": rate,
            "seconds": seconds,
            "orders": len(offsets),
            "accepted": len(sent),
            "completed": len(latencies),
            "errors": (self.errors - errors_before) + loop.exceptions + loop.overflow,
            "chain_ms": summarise(latencies),
            "send_lateness_ms": loop.lateness_ms,
            "drained": complete,
        }
        step["pass"] = step_passes(step)
        p99 = step["chain_ms"]["p99"]
        progress(
            f"raw chain {fmt_rate(rate)}/s: {step['completed']}/{step['orders']} chains, "
            f"p99 {p99:.0f} ms, errors {step['errors']} -> {'ok' if step['pass'] else 'FAIL'}"
            if p99 is not None
            else f"raw chain {fmt_rate(rate)}/s: no chain completed -> FAIL"
        )
        return step

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()
        for conn in self._conns:
            with contextlib.suppress(Exception):
                await conn.close()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()


async def raw_chain_ramp(
    dsn: str, kafka: KafkaTarget, namespace: str, cfg: BenchConfig, progress: Progress
) -> dict[str, Any]:
    chain = RawChain(dsn, kafka, namespace)
    await chain.start()
    try:
        # the five group joins and the first fetches happen here, not in the first step
        warm = [str(uuid.uuid4()) for _ in range(10)]
        for order_id in warm:
            await chain.send(order_id)
        if not await chain.wait_done(warm, 60):
            raise RuntimeError("the raw chain did not carry its warm-up messages through five hops in 60 s")
        rates = sorted({*cfg.raw_rates, cfg.raw_reference_rate})
        steps: list[dict[str, Any]] = []
        for rate in rates:
            step = await chain.step(rate, cfg.raw_step_seconds, cfg.raw_drain, progress)
            steps.append(step)
            if not step["pass"] and rate >= cfg.raw_reference_rate and not cfg.keep_going:
                break
            await asyncio.sleep(0.5)
    finally:
        await chain.stop()
    max_rate = find_knee(steps)
    at_ref = next((s for s in steps if s["rate"] == cfg.raw_reference_rate), None)
    return {
        "steps": steps,
        "max_rate": max_rate,
        # every rate held: the maximum is at least the highest rate tried
        "max_rate_is_lower_bound": bool(steps) and all(s["pass"] for s in steps),
        "reference_rate": cfg.raw_reference_rate,
        "p99_ms_at_reference_rate": at_ref["chain_ms"]["p99"] if at_ref else None,
        "p50_ms_at_reference_rate": at_ref["chain_ms"]["p50"] if at_ref else None,
    }


async def measure_raw(
    dsn: str, kafka: KafkaTarget, namespace: str, cfg: BenchConfig, progress: Progress
) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
    finally:
        await conn.close()
    seconds = cfg.raw_seconds
    progress(f"raw: Postgres transactions (2 inserts), sequential, {seconds:g} s")
    seq = await pg_transactions_per_s(dsn, seconds, 1)
    progress(f"raw: Postgres sequential {seq['per_s']:.0f} tx/s; now 16 concurrent, {seconds:g} s")
    conc = await pg_transactions_per_s(dsn, seconds, 16)
    progress(f"raw: Postgres 16 concurrent {conc['per_s']:.0f} tx/s")
    topic = f"{namespace}.raw.produce"
    await create_topics(kafka.bootstrap_servers, [topic])
    batched = await kafka_produce_batched(kafka, topic, seconds)
    progress(f"raw: Kafka produce batched (acks=all) {batched['per_s']:.0f} msg/s")
    awaited = await kafka_produce_awaited(kafka, topic, seconds)
    progress(f"raw: Kafka produce awaited one by one {awaited['per_s']:.0f} msg/s")
    total = int(batched["messages"]) + int(awaited["messages"])
    consumed = await kafka_consume(kafka, topic, total, timeout=max(30.0, seconds * 6))
    progress(f"raw: Kafka consume {consumed['per_s']:.0f} msg/s ({consumed['messages']}/{total})")
    progress("raw: 5-hop chain (consume -> inbox + state + outbox transaction -> produce acks=all)")
    chain = await raw_chain_ramp(dsn, kafka, namespace, cfg, progress)
    return {
        "postgres": {"sequential": seq, "concurrent_16": conc},
        "kafka": {"produce_batched": batched, "produce_awaited": awaited, "consume": consumed},
        "chain": chain,
    }
