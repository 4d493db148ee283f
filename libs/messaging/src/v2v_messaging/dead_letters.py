"""Dead letters kept in Postgres, in every service's own schema (`dead_letters`), besides the topic.

Two sources write here: a consumer that gives up on a message (poison; the raw record, where it was
read, the error and the attempts), and the outbox relay when the broker refuses a row (too large,
invalid: the row is moved here, consumer `outbox-relay`, so the relay goes on). One row per consumer and
event id: a message dead-lettered again after a replay updates its row (`occurrences`).

A dead letter can be replayed: its raw message is published again to its original topic, so the
consumer sees it again; the inbox still drops events it processed, and a message that failed was never
recorded there, so it is processed afresh.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from faststream.kafka import KafkaBroker
from opentelemetry.instrumentation.utils import suppress_instrumentation

RELAY_CONSUMER = "outbox-relay"  # the `consumer` of rows the relay moved aside
DLQ_HEADER_PREFIX = "x-v2v-dlq-"
MAX_LIST = 200


@dataclass(frozen=True)
class DeadLetter:
    id: int
    consumer: str
    topic: str
    kafka_partition: int | None
    kafka_offset: int | None
    event_id: uuid.UUID | None
    event_type: str | None
    message_key: bytes | None
    payload: bytes
    headers: dict[str, str]
    error: str
    attempts: int
    occurrences: int
    dead_lettered_at: datetime
    replayed_at: datetime | None
    replays: int

    @classmethod
    def of(cls, row: asyncpg.Record) -> DeadLetter:
        headers = row["headers"]
        if isinstance(headers, str):
            headers = json.loads(headers)
        return cls(
            id=row["id"],
            consumer=row["consumer"],
            topic=row["topic"],
            kafka_partition=row["kafka_partition"],
            kafka_offset=row["kafka_offset"],
            event_id=row["event_id"],
            event_type=row["event_type"],
            message_key=bytes(row["message_key"]) if row["message_key"] is not None else None,
            payload=bytes(row["payload"]),
            headers={str(k): str(v) for k, v in (headers or {}).items()},
            error=row["error"],
            attempts=row["attempts"],
            occurrences=row["occurrences"],
            dead_lettered_at=row["dead_lettered_at"],
            replayed_at=row["replayed_at"],
            replays=row["replays"],
        )

    def replay_headers(self) -> dict[str, str]:
        """The original headers, without the dead-letter bookkeeping."""
        return {k: v for k, v in self.headers.items() if not k.startswith(DLQ_HEADER_PREFIX)}


_COLUMNS = """id, consumer, topic, kafka_partition, kafka_offset, event_id, event_type, message_key,
              payload, headers::text AS headers, error, attempts, occurrences, dead_lettered_at,
              replayed_at, replays"""


async def record_dead_letter(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    consumer: str,
    topic: str,
    payload: bytes,
    error: str,
    attempts: int,
    partition: int | None = None,
    offset: int | None = None,
    event_id: uuid.UUID | None = None,
    event_type: str | None = None,
    key: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Insert (or, for the same consumer and event, update) a dead letter; returns its id."""
    with suppress_instrumentation():
        return int(
            await conn.fetchval(
                """INSERT INTO dead_letters (consumer, topic, kafka_partition, kafka_offset, event_id,
                                            event_type, message_key, payload, headers, error, attempts)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10, $11)
                   ON CONFLICT (consumer, event_id) WHERE event_id IS NOT NULL DO UPDATE SET
                       topic = EXCLUDED.topic, kafka_partition = EXCLUDED.kafka_partition,
                       kafka_offset = EXCLUDED.kafka_offset, event_type = EXCLUDED.event_type,
                       message_key = EXCLUDED.message_key, payload = EXCLUDED.payload,
                       headers = EXCLUDED.headers, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
                       occurrences = dead_letters.occurrences + 1, dead_lettered_at = now(),
                       replayed_at = NULL
                   RETURNING id""",
                consumer,
                topic,
                partition,
                offset,
                event_id,
                event_type,
                key,
                payload,
                json.dumps(headers or {}),
                error[:8000],
                attempts,
            )
        )


class DeadLetters:
    """The operations side of the `dead_letters` table: list, read, replay."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def list(self, *, limit: int = 50, before_id: int | None = None) -> list[DeadLetter]:
        """Newest first; `before_id` pages on (ids below it)."""
        limit = max(1, min(limit, MAX_LIST))
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM dead_letters WHERE ($2::bigint IS NULL OR id < $2)
                ORDER BY id DESC LIMIT $1""",
            limit,
            before_id,
        )
        return [DeadLetter.of(r) for r in rows]

    async def get(self, dead_letter_id: int) -> DeadLetter | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM dead_letters WHERE id = $1", dead_letter_id)
        return DeadLetter.of(row) if row is not None else None

    async def replay(self, dead_letter_id: int, broker: KafkaBroker) -> DeadLetter | None:
        """Publish the raw message again to its original topic (acks=all); None when there is no such
        dead letter. Raises the broker's error when it refuses the message."""
        letter = await self.get(dead_letter_id)
        if letter is None:
            return None
        await broker.publish(
            letter.payload, topic=letter.topic, key=letter.message_key, headers=letter.replay_headers()
        )
        row = await self.pool.fetchrow(
            f"""UPDATE dead_letters SET replayed_at = now(), replays = replays + 1 WHERE id = $1
                RETURNING {_COLUMNS}""",
            dead_letter_id,
        )
        return DeadLetter.of(row) if row is not None else letter


def decode_headers(raw: Any) -> dict[str, str]:
    """Kafka record headers (a list of (key, bytes) pairs) as text."""
    out: dict[str, str] = {}
    for k, v in raw or ():
        out[str(k)] = v.decode(errors="replace") if isinstance(v, bytes | bytearray) else str(v)
    return out
